"""The Python API (orchestrator/__init__.py): a tiny sweep launched in-process on a local Ray and SQLite
MLflow, its SweepResult checked against what the store holds; the queries, status and resume on it; the
quickstart notebook executed end to end."""
from __future__ import annotations

import gc
import itertools
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from orchestrator import SweepResult, best, compare, front, launch, resume, status, trials
from orchestrator.launch import LaunchError
from orchestrator.query import SweepNotFoundError
from orchestrator.spec import SpecError
from tests.helpers import REPO, cli_env, sqlite_uri, tiny_spec
from trainables.errors import UserError

PERF, FAIR = "accuracy", "equalized_odds_difference"


def _dominated(point: tuple[float, float], others: list[tuple[float, float]]) -> bool:
    """(accuracy, unfairness): another is at least as accurate and as fair, and better in one."""
    return any(o[0] >= point[0] and o[1] <= point[1] and o != point for o in others)


@pytest.mark.slow
def test_launch_returns_what_mlflow_holds_and_the_queries_agree(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    uri, storage = sqlite_uri(tmp_path), str(tmp_path / "results")
    spec = tiny_spec(**{"axes.seed": [0, 1]})  # 2 paradigms x 2 magnitudes x 2 depths x 2 seeds
    result = launch(spec, tracking_uri=uri, storage=storage, quiet=True)

    assert gc.get_freeze_count() == 0  # the driver froze its long-lived objects for the sweep only
    assert isinstance(result, SweepResult)
    assert (result.name, result.experiment, result.tracking_uri) == ("tiny", "tiny", uri)
    assert (result.performance, result.fairness) == (PERF, FAIR)
    assert (result.finished, result.failed, result.interrupted) == (16, (), False)
    with pytest.raises(Exception):  # frozen: a result is a record of what happened
        result.finished = 0  # type: ignore[misc]

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny")
    parents = client.search_runs([exp.experiment_id], "tags.`fairsweep.kind` = 'sweep'")
    assert [r.info.run_id for r in parents] == [result.parent_run_id]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}' "
                                   "AND tags.`fairsweep.kind` = 'trial'", max_results=1000)
    assert len(children) == 16 and all(r.info.status == "FINISHED" for r in children)
    assert set(result.trials["run_id"]) == {r.info.run_id for r in children}
    by_run = {r.info.run_id: r for r in children}
    for row in result.trials.itertuples():
        run = by_run[row.run_id]
        assert getattr(row, PERF) == run.data.metrics[PERF] and row.paradigm == run.data.params["paradigm"]

    # the front, recomputed from the runs: seed means per configuration, then non-dominated ones
    configs: dict[str, list] = {}
    for run in children:
        configs.setdefault(run.data.tags["fairsweep.config_key"], []).append(run)
    means = {key: (float(np.mean([r.data.metrics[PERF] for r in runs])),
                   float(np.mean([r.data.metrics[FAIR] for r in runs]))) for key, runs in configs.items()}
    on_front = {key for key, p in means.items() if not _dominated(p, list(means.values()))}
    assert set(result.front["config_key"]) == on_front and len(on_front) >= 1
    for row in result.front.itertuples():
        assert getattr(row, PERF) == pytest.approx(means[row.config_key][0])
        assert row.n_seeds == 2 and set(row.run_ids) == {r.info.run_id for r in configs[row.config_key]}

    # the queries read the same sweep back
    pd.testing.assert_frame_equal(front("tiny", tracking_uri=uri), result.front)
    everything = front("tiny", tracking_uri=uri, all_rows=True)
    assert len(everything) == 8 and set(everything.loc[everything["on_front"], "config_key"]) == on_front
    assert len(front("tiny", tracking_uri=uri, per_trial=True, all_rows=True)) == 16
    assert set(trials("tiny", tracking_uri=uri, filters={"paradigm": "scratch"})["paradigm"]) == {"scratch"}
    pick = best("tiny", tracking_uri=uri, max_drop=1.0)  # every configuration qualifies: the fairest on val
    fairest = min(means, key=lambda k: (float(np.mean([r.data.metrics[f"val_{FAIR}"] for r in configs[k]])),
                                        -float(np.mean([r.data.metrics[f"val_{PERF}"] for r in configs[k]]))))
    assert pick["config_key"].tolist() == [fairest]
    table = compare("tiny", tracking_uri=uri, by="paradigm", reference="supervised")
    assert sorted(table["paradigm"]) == ["scratch", "supervised"]

    state = status("tiny", storage=storage)
    assert (state.total, state.finished, state.errored, state.tracking_uri) == (16, 16, 0, uri)

    with pytest.raises(LaunchError, match="already exists"):  # a second launch of one name is refused
        launch(spec, tracking_uri=uri, storage=storage, quiet=True)
    capsys.readouterr()
    again = resume("tiny", storage=storage, quiet=True)  # nothing left to run: the same sweep comes back
    assert (again.parent_run_id, again.finished, again.failed) == (result.parent_run_id, 16, ())
    pd.testing.assert_frame_equal(again.front, result.front)
    assert "Configuration for experiment" not in capsys.readouterr().out  # no Tune tables when quiet
    # Tune's output follows the resuming command, not the launch it restores (which was quiet)
    loud = resume("tiny", storage=storage, verbose=True)
    assert "Trial status: 16 TERMINATED" in capsys.readouterr().out and loud.finished == 16


def test_a_mistake_raises_the_user_error_the_cli_prints(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError, match=r"objectives\.performance: got 'acuracy'"):
        launch(tiny_spec(**{"objectives.performance": "acuracy"}), tracking_uri=sqlite_uri(tmp_path), quiet=True)
    with pytest.raises(SpecError, match="no such sweep file"):
        launch(tmp_path / "missing.yaml")
    MlflowClient(sqlite_uri(tmp_path)).create_experiment("other")
    with pytest.raises(SweepNotFoundError, match="no MLflow experiment 'tiny'") as info:
        front("tiny", tracking_uri=sqlite_uri(tmp_path))
    assert isinstance(info.value, UserError)
    assert not (tmp_path / "fairsweep_results").exists()  # nothing was started


@pytest.mark.slow
def test_the_quickstart_notebook_launches_queries_and_plots(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    notebook = nbformat.read(REPO / "examples" / "quickstart.ipynb", as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=cli_env())  # raises CellExecutionError, with the cell's traceback, if any cell fails
    outputs = list(itertools.chain.from_iterable(c.get("outputs", []) for c in notebook.cells if c.cell_type == "code"))
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "16 trials finished, 0 failed; parent run " in text and "mlflow ui --backend-store-uri sqlite:///" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the front, plotted
    tables = [o["data"]["text/plain"] for o in outputs if "text/plain" in o.get("data", {})]
    assert any("on_front" in t and "True" in t for t in tables)


def test_the_sweep_figures_leave_the_process_matplotlib_backend_alone(tmp_path):
    """The tracker draws the front while a sweep runs; in a notebook that must not switch the kernel's
    backend (plots would stop showing inline), so figures are drawn without pyplot."""
    code = ("import matplotlib\nmatplotlib.use('svg')\nimport pandas as pd\n"
            "from orchestrator.figures import axis_figure, pareto_figure\n"
            "t = pd.DataFrame({'paradigm': ['a', 'b'], 'accuracy': [0.9, 0.8], 'eod': [0.3, 0.1], 'on_front': [True, True],"
            " 'intervention.magnitude': [0.5, 0.9]})\n"
            "pareto_figure(t, 'accuracy', 'eod').savefig('front.png')\n"
            "axis_figure(t, 'intervention.magnitude', 'accuracy', 'eod').savefig('axis.png')\n"
            "print(matplotlib.get_backend())\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "svg"
    for name in ("front.png", "axis.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_driver_freezes_its_long_lived_objects_only_for_the_sweep():
    """The sweep's driver leaves the objects that exist before it (torch, Ray, MLflow) out of its full collections,
    still collects what the sweep discards, and hands the process back with its collector as it found it; a
    process that froze objects itself keeps them frozen."""
    import weakref

    from orchestrator.launch import _long_lived_objects_frozen

    class Node:
        pass

    assert gc.get_freeze_count() == 0
    with _long_lived_objects_frozen():
        assert gc.get_freeze_count() > 0
        cycle = Node()
        cycle.me = cycle
        alive = weakref.ref(cycle)
        del cycle
        for _ in range(5):  # gc.collect() does nothing while another thread's collection runs (MLflow's, SQLAlchemy's)
            gc.collect()
            if alive() is None:
                break
        assert alive() is None  # made during the sweep: collected as usual
    assert gc.get_freeze_count() == 0
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with _long_lived_objects_frozen():
            pass
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
