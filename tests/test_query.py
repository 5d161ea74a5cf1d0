"""The query API and CLI against runs with known metrics logged straight into MLflow, checked by brute force."""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import time

import pandas as pd
import pytest

from orchestrator import query
from tests.helpers import REPO, UNREACHABLE_URI, cli_env, run_cli, sqlite_uri

PERF, FAIR = "accuracy", "equalized_odds_difference"
TOL = 1e-12
PER_TRIAL_ON_TEST = {"by_config": False, "select_on": "test"}  # the pick algorithm itself, checked by brute force

# (paradigm, magnitude, freeze_depth, seed, accuracy, eod); None = metric not logged
SWEEP_A = [
    ("scratch", 0.5, "0", 0, 0.80, 0.20), ("scratch", 0.5, "0", 1, 0.82, 0.10),
    ("scratch", 0.9, "0", 0, 0.78, 0.05), ("scratch", 0.9, "0", 1, 0.78, 0.07),
    ("supervised", 0.5, "0", 0, 0.85, 0.30), ("supervised", 0.5, "0", 1, 0.87, 0.25),
    ("supervised", 0.9, "linear", 0, 0.86, 0.12), ("supervised", 0.9, "linear", 1, 0.84, 0.12),
    ("simclr", 0.5, "0", 0, 0.86, 0.12),  # ties supervised/0.9 on eod with higher accuracy than its seed 1
    ("simclr", 0.9, "0", 0, 0.70, 0.02),
    ("simclr", 0.9, "linear", 0, 0.88, None),  # missing fairness: never on the front, never the best
]
SWEEP_B = [("scratch", 0.5, "0", 0, 0.60, 0.01), ("supervised", 0.5, "0", 0, 0.95, 0.40)]


def _log(client, exp_id: str, sweep: str, trial, status: str = "FINISHED", val: tuple | None = ()) -> str:
    """One trial run; ``val`` = (val_accuracy, val_eod), () for the test values again, None for no val_ metrics."""
    from mlflow.entities import Metric, Param

    paradigm, mag, freeze, seed, acc, eod = trial
    config_key = f"{sweep}-{paradigm}-{mag}-{freeze}"
    run = client.create_run(exp_id, tags={"fairsweep.kind": "trial", "fairsweep.sweep": sweep,
                                          "fairsweep.trial_key": f"{config_key}-s{seed}", "fairsweep.config_key": config_key,
                                          "fairsweep.pareto_front": "false"})
    params = {"backbone": "test_resnet", "paradigm": paradigm, "intervention.kind": "correlation",
              "intervention.magnitude": str(mag), "freeze_depth": freeze, "seed": str(seed)}
    metrics = {"accuracy": acc, "equalized_odds_difference": eod, "auroc": None if acc is None else acc - 0.05}
    if val is not None:
        metrics["val_accuracy"], metrics["val_equalized_odds_difference"] = val or (acc, eod)
    now = int(time.time() * 1000)
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()],
                     metrics=[Metric(k, v, now, 0) for k, v in metrics.items() if v is not None])
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def _parent(client, exp_id: str, sweep: str) -> None:
    from mlflow.entities import Param

    run = client.create_run(exp_id, tags={"fairsweep.kind": "sweep", "fairsweep.sweep": sweep})
    client.log_batch(run.info.run_id, params=[Param("objectives.performance", PERF), Param("objectives.fairness", FAIR)])


def populate(client) -> dict:
    exp_id = client.create_experiment("exp1")
    _parent(client, exp_id, "sA")
    _parent(client, exp_id, "sB")
    ids = {"sA": [_log(client, exp_id, "sA", t) for t in SWEEP_A], "sB": [_log(client, exp_id, "sB", t, val=None) for t in SWEEP_B]}
    ids["failed"] = _log(client, exp_id, "sA", ("simclr", 0.5, "linear", 0, 0.99, 0.0), status="FAILED")
    solo = client.create_experiment("solo")
    _parent(client, solo, "solo")
    ids["solo"] = [_log(client, solo, "solo", ("scratch", 0.5, "0", 0, 0.7, 0.1))]
    return ids


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("query")
    uri = sqlite_uri(tmp)
    client = MlflowClient(tracking_uri=uri)
    ids = populate(client)
    return {"uri": uri, "client": client, "ids": ids, "tmp": tmp}


# -- brute force ----------------------------------------------------------------------------------
def _valid(rows):
    return [r for r in rows if r[PERF] is not None and r[FAIR] is not None
            and not (isinstance(r[FAIR], float) and math.isnan(r[FAIR]))]


def brute_front(rows):
    valid = _valid(rows)

    def dominated(a):
        return any(b[PERF] >= a[PERF] and b[FAIR] <= a[FAIR] and (b[PERF] > a[PERF] or b[FAIR] < a[FAIR]) for b in valid)

    return [r for r in valid if not dominated(r)]


def brute_best(rows, drop, ref_perf=None):
    valid = _valid(rows)
    top = ref_perf if ref_perf is not None else max(r[PERF] for r in valid)
    ok = [r for r in valid if r[PERF] >= top - drop - TOL]
    return min(ok, key=lambda r: (r[FAIR], -r[PERF]))


def trial_rows(data):
    return [{"paradigm": p, "mag": m, "freeze": f, "seed": s, PERF: a, FAIR: e} for p, m, f, s, a, e in data]


def config_rows(data):
    groups: dict = {}
    for r in trial_rows(data):
        groups.setdefault((r["paradigm"], r["mag"], r["freeze"]), []).append(r)
    out = []
    for key, rs in groups.items():
        accs = [r[PERF] for r in rs]
        eods = [r[FAIR] for r in rs if r[FAIR] is not None]
        out.append({"key": key, PERF: statistics.mean(accs), FAIR: statistics.mean(eods) if eods else None,
                    "acc_std": statistics.stdev(accs) if len(accs) > 1 else None, "n": len(rs), "eod_n": len(eods)})
    return out


# -- Python API -----------------------------------------------------------------------------------
def test_sweep_trials_keeps_sweeps_apart_and_drops_failed(store):
    c, ids = store["client"], store["ids"]
    a = query.sweep_trials(c, "sA", "exp1")
    assert sorted(a["run_id"]) == sorted(ids["sA"])
    assert ids["failed"] not in set(a["run_id"])
    assert sorted(query.sweep_trials(c, "sB", "exp1")["run_id"]) == sorted(ids["sB"])
    assert len(query.sweep_trials(c, "sA", "exp1", finished_only=False)) == len(SWEEP_A) + 1
    sup = query.sweep_trials(c, "sA", "exp1", filters={"paradigm": "supervised", "intervention.magnitude": 0.9})
    assert len(sup) == 2 and set(sup["freeze_depth"]) == {"linear"}
    both = query.sweep_trials(c, "sA", "exp1", filters={"paradigm": ["scratch", "simclr"]})
    assert len(both) == sum(t[0] in ("scratch", "simclr") for t in SWEEP_A)
    assert query.sweep_objectives(c, "sA", "exp1") == (PERF, FAIR)
    assert query.list_sweeps(c, "exp1") == ["sA", "sB"]
    solo = query.sweep_trials(c, "solo")  # experiment defaults to the sweep's name
    assert list(solo["run_id"]) == ids["solo"]


def test_unknown_names_list_what_exists(store):
    c = store["client"]
    with pytest.raises(query.SweepNotFoundError, match="experiments: .*exp1"):
        query.sweep_trials(c, "sA", "nope")
    with pytest.raises(query.SweepNotFoundError, match="sweeps there: sA, sB"):
        query.sweep_trials(c, "sZ", "exp1")
    trials = query.sweep_trials(c, "sA", "exp1")
    with pytest.raises(ValueError, match="unknown metric"):
        query.pareto(trials, "acuracy", FAIR)
    with pytest.raises(ValueError, match="not logged"):
        query.pareto(trials, "auprc", FAIR)
    with pytest.raises(ValueError, match="cannot filter"):
        query.sweep_trials(c, "sA", "exp1", filters={"colour": "red"})


def test_pareto_per_trial_matches_brute_force(store):
    trials = query.sweep_trials(store["client"], "sA", "exp1")
    got = query.pareto(trials, PERF, FAIR, by_config=False)
    want = brute_front(trial_rows(SWEEP_A))
    assert sorted(zip(got[PERF], got[FAIR])) == sorted((r[PERF], r[FAIR]) for r in want)
    full = query.pareto(trials, PERF, FAIR, by_config=False, front_only=False)
    assert len(full) == len(SWEEP_A) and full["on_front"].sum() == len(want)


def test_pareto_by_config_means_std_count(store):
    trials = query.sweep_trials(store["client"], "sA", "exp1")
    full = query.pareto(trials, PERF, FAIR, front_only=False)
    want = {(r[PERF], r[FAIR] if r[FAIR] is not None else -1): r for r in config_rows(SWEEP_A)}
    assert len(full) == len(want)
    for _, row in full.iterrows():
        key = (row["paradigm"], row["intervention.magnitude"], row["freeze_depth"])
        ref = next(r for r in config_rows(SWEEP_A) if r["key"] == key)
        assert row[PERF] == pytest.approx(ref[PERF])
        assert row["n_seeds"] == ref["n"] and row[f"{FAIR}_count"] == ref["eod_n"] and row[f"{PERF}_count"] == ref["n"]
        if ref["acc_std"] is None:
            assert math.isnan(row[f"{PERF}_std"])
        else:
            assert row[f"{PERF}_std"] == pytest.approx(ref["acc_std"])
        assert len(row["run_ids"]) == ref["n"] and len(row["trial_keys"]) == ref["n"]
    front = brute_front(config_rows(SWEEP_A))
    got = full[full["on_front"]]
    assert sorted(zip(got[PERF].round(12), got[FAIR].round(12))) == sorted((round(r[PERF], 12), round(r[FAIR], 12)) for r in front)


@pytest.mark.parametrize("drop", [0.0, 0.01, 0.02, 0.05, 0.2])
def test_best_matches_brute_force(store, drop):
    trials = query.sweep_trials(store["client"], "sA", "exp1")
    got = query.best(trials, PERF, FAIR, max_drop=drop, **PER_TRIAL_ON_TEST)
    want = brute_best(trial_rows(SWEEP_A), drop)
    assert len(got) == 1
    assert (got[PERF][0], got[FAIR][0]) == (want[PERF], want[FAIR])
    rel = query.best(trials, PERF, FAIR, max_rel_drop=drop / 0.87, **PER_TRIAL_ON_TEST)
    assert (rel[PERF][0], rel[FAIR][0]) == (want[PERF], want[FAIR])


def test_best_ties_go_to_higher_performance(store):
    trials = query.sweep_trials(store["client"], "sA", "exp1")
    # within 0.03 of 0.87 the lowest eod, 0.12, is shared by 0.84 and two trials at 0.86: 0.86 wins
    got = query.best(trials, PERF, FAIR, max_drop=0.03, **PER_TRIAL_ON_TEST)
    assert (got[PERF][0], got[FAIR][0]) == (0.86, 0.12)


def test_best_with_reference(store):
    trials = query.sweep_trials(store["client"], "sA", "exp1")
    got = query.best(trials, PERF, FAIR, max_drop=0.02, reference={"paradigm": "scratch"}, **PER_TRIAL_ON_TEST)
    want = brute_best(trial_rows(SWEEP_A), 0.02, ref_perf=0.82)
    assert (got[PERF][0], got[FAIR][0]) == (want[PERF], want[FAIR]) == (0.82, 0.10)
    assert got[f"reference_{PERF}"][0] == 0.82
    with pytest.raises(ValueError, match="values present"):
        query.best(trials, PERF, FAIR, max_drop=0.02, reference={"paradigm": "byol"}, **PER_TRIAL_ON_TEST)


def test_single_trial_sweep(store):
    trials = query.sweep_trials(store["client"], "solo")
    assert len(query.pareto(trials, PERF, FAIR)) == 1
    assert query.best(trials, PERF, FAIR, max_drop=0.0, select_on="test")["run_id"][0] == store["ids"]["solo"][0]
    table = query.compare(trials, "paradigm", PERF, FAIR, max_drop=0.01, select_on="test")
    assert len(table) == 1 and table["rel_change"][0] == 0.0


@pytest.mark.parametrize("drop", [0.01, 0.05, 0.2])
def test_compare_matches_brute_force(store, drop):
    trials = query.sweep_trials(store["client"], "sA", "exp1")
    table = query.compare(trials, "paradigm", PERF, FAIR, max_drop=drop, reference_group="supervised",
                          **PER_TRIAL_ON_TEST).set_index("paradigm")
    rows = trial_rows(SWEEP_A)
    top = max(r[PERF] for r in _valid(rows))
    want = {}
    for p in ("scratch", "simclr", "supervised"):
        ok = [r for r in _valid(rows) if r["paradigm"] == p and r[PERF] >= top - drop - TOL]
        want[p] = min(ok, key=lambda r: (r[FAIR], -r[PERF]))[FAIR] if ok else None
    for p, fair in want.items():
        if fair is None:
            assert math.isnan(table.loc[p, FAIR])
        else:
            assert table.loc[p, FAIR] == fair
            if want["supervised"] is not None:
                assert table.loc[p, "rel_change"] == pytest.approx((fair - want["supervised"]) / want["supervised"])


# -- CLI ------------------------------------------------------------------------------------------
def _cli(store, *args):
    return run_cli(*args, "--tracking-uri", store["uri"], cwd=store["tmp"], timeout=120)


def test_cli_pareto_formats(store):
    js = _cli(store, "pareto", "sA", "--experiment", "exp1", "--format", "json")
    assert js.returncode == 0, js.stderr
    records = json.loads(js.stdout)
    want = brute_front(config_rows(SWEEP_A))
    assert sorted(round(r[PERF], 12) for r in records) == sorted(round(r[PERF], 12) for r in want)
    assert all({"run_id", "trial_key", "run_ids", "trial_keys", "paradigm", "freeze_depth", FAIR} <= set(r) for r in records)
    assert all(r["run_id"] == r["run_ids"][0] and r["trial_key"] == r["trial_keys"][0] for r in records)
    assert all(r["trial_key"].endswith("-s0") for r in records)  # the first seed's trial names the configuration
    csv = _cli(store, "pareto", "sA", "--experiment", "exp1", "--format", "csv", "--per-trial")
    assert csv.returncode == 0, csv.stderr
    df = pd.read_csv(io.StringIO(csv.stdout))
    assert len(df) == len(brute_front(trial_rows(SWEEP_A))) and "run_id" in df
    table = _cli(store, "pareto", "solo")
    assert table.returncode == 0 and "scratch" in table.stdout


def test_cli_best_and_compare(store):
    js = _cli(store, "best", "sA", "--experiment", "exp1", "--max-drop", "0.02", "--format", "json", "--per-trial",
              "--select-on", "test")
    assert js.returncode == 0, js.stderr
    (rec,) = json.loads(js.stdout)
    want = brute_best(trial_rows(SWEEP_A), 0.02)
    assert (rec[PERF], rec[FAIR]) == (want[PERF], want[FAIR]) and rec["run_id"] and rec["trial_key"]
    tab = _cli(store, "best", "sA", "--experiment", "exp1", "--max-rel-drop", "0.01", "--reference", "paradigm=scratch",
               "--select-on", "test")
    assert tab.returncode == 0, tab.stderr
    cmp = _cli(store, "compare", "sA", "--experiment", "exp1", "--by", "paradigm", "--reference", "supervised",
               "--max-drop", "0.05", "--format", "json", "--select-on", "test")
    assert cmp.returncode == 0, cmp.stderr
    got = {r["paradigm"]: r for r in json.loads(cmp.stdout)}
    assert set(got) == {"scratch", "simclr", "supervised"} and got["supervised"]["rel_change"] == 0.0
    csv = _cli(store, "compare", "sA", "--experiment", "exp1", "--by", "intervention.magnitude", "--format", "csv",
               "--select-on", "test")
    assert csv.returncode == 0, csv.stderr
    assert "rel_change" in csv.stdout and len(pd.read_csv(io.StringIO(csv.stdout))) == 2


@pytest.mark.parametrize("args,needle", [
    (("pareto", "sA", "--experiment", "exp1", "--perf", "acuracy"), "unknown metric"),
    (("pareto", "sA", "--experiment", "nope"), "experiments:"),
    (("best", "sZ", "--experiment", "exp1", "--max-drop", "0.01"), "sweeps there: sA, sB"),
    (("compare", "sA", "--experiment", "exp1", "--by", "colour"), "cannot group by"),
])
def test_cli_bad_input_exit_2(store, args, needle):
    r = _cli(store, *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert needle in r.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_unreachable_server_exit_2(tmp_path):
    r = run_cli("pareto", "sA", "--tracking-uri", UNREACHABLE_URI, cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and "cannot reach" in r.stderr


# -- a real tracking server -----------------------------------------------------------------------
@pytest.fixture
def server(tmp_path):
    mlflow_bin = REPO / ".venv" / "bin" / "mlflow"
    exe = str(mlflow_bin) if mlflow_bin.exists() else shutil.which("mlflow")
    if exe is None:
        pytest.skip("no mlflow executable")
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([exe, "server", "--backend-store-uri", f"sqlite:///{(tmp_path / 'srv.db').resolve()}",
                             "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env=cli_env())
    uri = f"http://127.0.0.1:{port}"
    try:
        import urllib.request

        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield uri
    finally:
        try:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, 9)
        log.close()


@pytest.mark.slow
def test_against_mlflow_server(server, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=server)
    populate(client)
    trials = query.sweep_trials(client, "sA", "exp1")
    assert len(trials) == len(SWEEP_A)
    want = brute_best(trial_rows(SWEEP_A), 0.02)
    got = query.best(trials, PERF, FAIR, max_drop=0.02, **PER_TRIAL_ON_TEST)
    assert (got[PERF][0], got[FAIR][0]) == (want[PERF], want[FAIR])
    r = run_cli("compare", "sA", "--experiment", "exp1", "--by", "paradigm", "--format", "json",
                "--tracking-uri", server, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert {x["paradigm"] for x in json.loads(r.stdout)} == {"scratch", "simclr", "supervised"}
    bad = run_cli("pareto", "sZ", "--experiment", "exp1", "--tracking-uri", server, cwd=tmp_path, timeout=60)
    assert bad.returncode == 2 and "sweeps there: sA, sB" in bad.stderr


def test_report_summary_names_the_brute_force_fairest_configuration(store, tmp_path):
    from orchestrator.report import write_report

    report = write_report(store["client"], "sA", tmp_path / "r", experiment="exp1", max_drop=0.02, log_to_mlflow=False)
    names = {p.name for p in report.files}
    assert {"pareto.png", "vs_intervention_magnitude.png", "vs_freeze_depth.png", "summary.md"} <= names
    assert report.n_trials == len(SWEEP_A) and report.front_size == len(brute_front(config_rows(SWEEP_A)))
    want = brute_best(config_rows(SWEEP_A), 0.02)
    summary = (tmp_path / "r" / "summary.md").read_text()
    section = summary.split("## Fairest within 0.02 of the best accuracy", 1)[1]
    assert f"accuracy {want[PERF]:.4f}" in section and f"equalized_odds_difference {want[FAIR]:.4f}" in section
    assert f"`{want['key'][0]}`" in section


# -- validation-based picks, intervals, paired tests ------------------------------------------------
# (paradigm, seed, test accuracy, test eod, val accuracy, val eod): "lucky" looks best on test only
SWEEP_V = [("lucky", s, 0.90 + d, 0.05 + d, 0.80 + d, 0.30 + d) for s, d in ((0, 0.0), (1, 0.01), (2, -0.01))] + \
          [("steady", s, 0.88 + d, 0.15 + d, 0.89 + d, 0.10 + d) for s, d in ((0, 0.0), (1, 0.01), (2, -0.01))]


@pytest.fixture(scope="module")
def val_store(store):
    client = store["client"]
    exp_id = client.create_experiment("valexp")
    _parent(client, exp_id, "sV")
    for paradigm, seed, acc, eod, vacc, veod in SWEEP_V:
        _log(client, exp_id, "sV", (paradigm, 0.5, "0", seed, acc, eod), val=(vacc, veod))
    return store


def test_best_chooses_on_validation_and_reports_the_test_metrics(val_store):
    trials = query.sweep_trials(val_store["client"], "sV", "valexp")
    pick = query.best(trials, PERF, FAIR, max_drop=0.02)  # defaults: configuration means, chosen on val
    assert pick["paradigm"][0] == "steady" and pick["selected_on"][0] == "val"
    assert pick[PERF][0] == pytest.approx(0.88) and pick[FAIR][0] == pytest.approx(0.15)  # its test metrics
    assert pick[f"reference_val_{PERF}"][0] == pytest.approx(0.89) and pick["n_seeds"][0] == 3
    on_test = query.best(trials, PERF, FAIR, max_drop=0.02, select_on="test")  # optimistic: the test split chooses
    assert on_test["paradigm"][0] == "lucky"
    front_val = query.pareto(trials, PERF, FAIR, split="val")
    assert list(front_val["paradigm"]) == ["steady"] and f"val_{PERF}_ci_low" in front_val


def test_configuration_means_carry_student_t_intervals(store):
    from scipy import stats

    trials = query.sweep_trials(store["client"], "sA", "exp1")
    table = query.pareto(trials, PERF, FAIR, front_only=False)
    for _, row in table.iterrows():
        accs = trials[trials["config_key"] == row["config_key"]][PERF].to_numpy(float)
        if len(accs) < 2:
            assert math.isnan(row[f"{PERF}_ci_low"]) and math.isnan(row[f"{PERF}_ci_high"])
            continue
        if accs.std() == 0:  # identical repeats: a zero-width interval (scipy answers NaN for scale 0)
            low = high = accs.mean()
        else:
            low, high = stats.t.interval(0.95, len(accs) - 1, loc=accs.mean(), scale=stats.sem(accs))
            low, high = max(low, 0.0), min(high, 1.0)  # accuracy's range
        assert (row[f"{PERF}_ci_low"], row[f"{PERF}_ci_high"]) == (pytest.approx(low), pytest.approx(high))


def _frame(rows: list[dict]) -> pd.DataFrame:
    """Trial rows as sweep_trials returns them, for the pure query functions."""
    df = pd.DataFrame(rows)
    for col, default in (("backbone", "test_resnet"), ("intervention.kind", "correlation"), ("freeze_depth", "0")):
        df[col] = df.get(col, default)
    df["config_key"] = df[["paradigm", "intervention.magnitude"]].astype(str).agg("-".join, axis=1)
    df["trial_key"] = df["config_key"] + "-s" + df["seed"].astype(str)
    df["run_id"] = "r-" + df["trial_key"]
    df["status"] = "FINISHED"
    return df


def test_intervals_over_seeds_stay_within_what_the_metric_can_take():
    """Two seeds (t(0.975, 1) = 12.7) near a metric's edge: accuracy's interval stops at 1, equalized odds' at 0,
    tpr_difference's at -1 and 1, and a column that is no registered metric keeps its raw t-interval."""
    trials = _frame([{"paradigm": "p", "intervention.magnitude": 0.5, "seed": k, PERF: acc, FAIR: eod,
                      f"val_{PERF}": acc, f"val_{FAIR}": eod, "tpr_difference": tpr, "val_loss": loss}
                     for k, (acc, eod, tpr, loss) in enumerate([(0.99, 0.0, -0.9, 0.1), (0.95, 0.04, 0.8, 0.3)])])
    import numpy as np

    def half(v: list[float]) -> float:
        return 12.7062047 * np.std(v, ddof=1) / np.sqrt(2)

    row = query.aggregate_seeds(trials, [PERF, FAIR, "tpr_difference", "val_loss"]).iloc[0]
    assert row[f"{PERF}_ci_low"] == pytest.approx(0.97 - half([0.99, 0.95])) and row[f"{PERF}_ci_high"] == 1.0
    assert row[f"{FAIR}_ci_low"] == 0.0 and row[f"{FAIR}_ci_high"] == pytest.approx(0.02 + half([0.0, 0.04]))
    assert (row["tpr_difference_ci_low"], row["tpr_difference_ci_high"]) == (-1.0, 1.0)
    assert row["val_loss_ci_low"] < 0 and row["val_loss_ci_low"] == pytest.approx(0.2 - half([0.1, 0.3]))  # no range
    assert query.t_interval([0.99, 0.95]) == pytest.approx((0.97 - half([0.99, 0.95]), 0.97 + half([0.99, 0.95])))
    assert query.t_interval([1.4, 1.6], bounds=(0.0, 1.0)) == pytest.approx((1.5 - half([1.4, 1.6]),
                                                                             1.5 + half([1.4, 1.6])))  # wrong bounds
    # the pick's table carries the same clipped intervals, validation columns included
    pick = query.best(trials, PERF, FAIR, max_drop=0.01)
    assert pick["selected_on"][0] == "val" and pick[f"{PERF}_ci_high"][0] == 1.0 and pick[f"{FAIR}_ci_low"][0] == 0.0
    val = query.aggregate_seeds(trials, [f"val_{PERF}", f"val_{FAIR}"]).iloc[0]
    assert val[f"val_{PERF}_ci_high"] == 1.0 and val[f"val_{FAIR}_ci_low"] == 0.0


def test_paired_tests_equal_scipy_with_holm_correction():
    import numpy as np
    from scipy import stats

    rng = np.random.default_rng(3)
    rows = [{"paradigm": p, "intervention.magnitude": m, "seed": str(s), PERF: 0.8,
             FAIR: float(shift + rng.normal(0, 0.05))}
            for p, shift in (("supervised", 0.20), ("simclr", 0.10), ("byol", 0.19))
            for m in (0.5, 0.7, 0.9) for s in range(4)]
    rows.append({"paradigm": "simclr", "intervention.magnitude": 0.3, "seed": "0", PERF: 0.8, FAIR: 0.5})  # no match
    trials = _frame(rows)
    got = query.paired_tests(trials, "paradigm", FAIR, "supervised").set_index("paradigm")
    ref = trials[trials["paradigm"] == "supervised"].set_index(["intervention.magnitude", "seed"])[FAIR]
    raw = {}
    for p in ("simclr", "byol"):
        mine = trials[trials["paradigm"] == p].set_index(["intervention.magnitude", "seed"])[FAIR]
        a, b = mine.align(ref, join="inner")
        raw[p] = (stats.ttest_rel(a, b).pvalue, stats.wilcoxon(a - b).pvalue)
        assert got.loc[p, "n_pairs"] == len(a) == 12 and got.loc[p, "mean_diff"] == pytest.approx(float((a - b).mean()))
    for j, col in enumerate(("p_ttest", "p_wilcoxon")):
        (lo_p, lo), (hi_p, hi) = sorted(((raw[p][j], p) for p in raw))
        holm_lo = min(1.0, 2 * lo_p)
        assert got.loc[lo, col] == pytest.approx(holm_lo)
        assert got.loc[hi, col] == pytest.approx(max(holm_lo, min(1.0, hi_p)))
    assert got.loc["simclr", "p_ttest"] < 0.05 < got.loc["byol", "p_ttest"]  # a real gap, and none
    assert got.loc["supervised", "n_pairs"] == 0 and math.isnan(got.loc["supervised", "p_ttest"])


def test_holm_by_hand():
    got = query.holm([0.01, 0.04, 0.03, float("nan")])
    assert got[:3] == pytest.approx([0.03, 0.06, 0.06]) and math.isnan(got[3])


def test_relative_change_against_a_perfectly_fair_reference_is_defined():
    assert query.relative_change(0.0, 0.0) == 0.0 and query.relative_change(0.1, 0.0) == math.inf
    assert query.relative_change(0.05, 0.1) == pytest.approx(-0.5)
    trials = _frame([{"paradigm": p, "intervention.magnitude": 0.5, "seed": "0", PERF: 0.8, FAIR: f}
                     for p, f in (("supervised", 0.0), ("simclr", 0.0), ("byol", 0.2))])
    table = query.compare(trials, "paradigm", PERF, FAIR, reference_group="supervised", select_on="test").set_index("paradigm")
    assert table.loc["simclr", "rel_change"] == 0.0 and table.loc["byol", "rel_change"] == math.inf
    assert not table["rel_change"].isna().any()


def test_a_signed_fairness_metric_is_minimised_in_absolute_value():
    trials = _frame([{"paradigm": "over", "intervention.magnitude": 0.5, "seed": "0", PERF: 0.9, "tpr_difference": -0.3},
                     {"paradigm": "near", "intervention.magnitude": 0.5, "seed": "0", PERF: 0.8, "tpr_difference": 0.1}])
    front = query.pareto(trials, PERF, "tpr_difference")
    assert sorted(front["paradigm"]) == ["near", "over"]  # -0.3 is further from parity than 0.1: no domination
    pick = query.best(trials, PERF, "tpr_difference", max_drop=0.2, select_on="test")
    assert pick["paradigm"][0] == "near" and pick["tpr_difference"][0] == 0.1  # the sign is kept in the table


def test_cli_picks_on_validation_with_intervals_and_paired_tests(val_store):
    js = _cli(val_store, "best", "sV", "--experiment", "valexp", "--max-drop", "0.02", "--format", "json")
    assert js.returncode == 0, js.stderr
    (rec,) = json.loads(js.stdout)
    assert rec["paradigm"] == "steady" and rec["selected_on"] == "val" and rec[f"{PERF}_ci_low"] < rec[PERF]
    cmp = _cli(val_store, "compare", "sV", "--experiment", "valexp", "--by", "paradigm", "--reference", "steady",
               "--max-drop", "0.2", "--format", "json")
    assert cmp.returncode == 0, cmp.stderr
    got = {r["paradigm"]: r for r in json.loads(cmp.stdout)}
    assert got["steady"]["n_seeds"] == 3 and got["steady"][f"{FAIR}_std"] == pytest.approx(0.01)  # the pick's spread
    assert got["steady"][f"{FAIR}_ci_low"] < got["steady"][FAIR] < got["steady"][f"{FAIR}_ci_high"]
    # matched on every other axis and the seed: three pairs, lucky 0.10 fairer on test in each
    assert got["lucky"]["n_pairs"] == 3 and got["lucky"]["mean_diff"] == pytest.approx(-0.10)
    assert got["lucky"]["p_wilcoxon"] == pytest.approx(0.25) and "p_ttest" in got["lucky"]  # n = 3: 2/2^3 at best
    stale = _cli(val_store, "best", "sB", "--experiment", "exp1", "--max-drop", "0.02")
    assert stale.returncode == 2 and "--select-on test" in stale.stderr


def test_the_launch_summary_line_names_the_fairest_pick_and_the_biased_probe():
    from orchestrator.report import front_story

    rows = []
    for seed in ("0", "1"):
        for paradigm, freeze, acc, eod, vacc, veod in (("biased", "linear", 0.70, 0.90, 0.70, 0.90),
                                                       ("supervised", "linear", 0.85, 0.10, 0.85, 0.10),
                                                       ("supervised", "0", 0.86, 0.30, 0.86, 0.30),
                                                       ("scratch", "0", 0.845, 0.05, 0.80, 0.02)):
            rows.append({"paradigm": paradigm, "freeze_depth": freeze, "intervention.magnitude": 0.5, "seed": seed,
                         PERF: acc, FAIR: eod, f"val_{PERF}": vacc, f"val_{FAIR}": veod})
    trials = _frame(rows)
    trials["config_key"] = trials["config_key"] + "-" + trials["freeze_depth"]
    line = front_story(trials, PERF, FAIR)
    # on validation scratch is 6 points behind, so the pick is supervised's probe, not the test-fairer scratch
    assert line.startswith("fairest within 0.01 of the best accuracy (chosen on val): supervised / freeze linear")
    assert "accuracy 0.850" in line and f"{FAIR} 0.100" in line
    assert f"{FAIR} of a linear probe on the biased base 0.900 (other bases: supervised 0.100)" in line
    assert line.endswith("the biased base passes on +0.800 [0.8000, 0.8000] over supervised (paired over magnitudes "
                         "and seeds, 2 pairs)")  # paper A's inheritance, query.inheritance
    assert front_story(trials.iloc[0:0], PERF, FAIR) == ""


def test_paired_tests_pair_each_matched_cell_once():
    """An optuna search may run one cell twice (two learning rates): its values are averaged, never crossed."""
    rows = [{"paradigm": p, "intervention.magnitude": 0.5, "seed": s, PERF: 0.8, FAIR: f}
            for p, fs in (("supervised", (0.30, 0.40)), ("simclr", (0.10, 0.20))) for s in ("0", "1") for f in fs]
    got = query.paired_tests(_frame(rows), "paradigm", FAIR, "supervised").set_index("paradigm")
    assert got.loc["simclr", "n_pairs"] == 2 and got.loc["simclr", "mean_diff"] == pytest.approx(-0.2)


def test_the_t_quantile_is_scipy_stats_own():
    from scipy import stats

    from orchestrator.query import _t_quantile

    for df in (1, 2, 5, 30, 1000):
        for q in (0.5, 0.9, 0.975, 0.995):
            assert _t_quantile(q, df) == pytest.approx(float(stats.t.ppf(q, df)), rel=1e-12, abs=1e-12)


# -- signed metrics over seeds, refused questions, the hypervolume's reference ------------------------
SIGNED = "tpr_difference"


def _flipping_and_steady() -> pd.DataFrame:
    """The reviewer's case: "flipping" favours one group on seed 0 and the other on seed 1 (+0.3, -0.3),
    "steady" stays 0.05 from parity; equal accuracy, validation equal to test."""
    rows = [{"paradigm": p, "intervention.magnitude": 0.5, "seed": str(s), PERF: 0.8, SIGNED: t,
             f"val_{PERF}": 0.8, f"val_{SIGNED}": t}
            for p, ts in (("flipping", (0.3, -0.3)), ("steady", (0.05, 0.05))) for s, t in enumerate(ts)]
    return _frame(rows)


def test_a_signed_metric_is_averaged_over_seeds_by_its_distance_from_parity():
    trials = _flipping_and_steady()
    agg = query.aggregate_seeds(trials, [SIGNED, "val_loss"]).set_index("paradigm")
    assert agg.loc["flipping", SIGNED] == 0.0 and agg.loc["flipping", f"{SIGNED}_abs"] == pytest.approx(0.3)  # sign kept
    assert (agg.loc["flipping", f"{SIGNED}_abs_ci_low"], agg.loc["flipping", f"{SIGNED}_abs_ci_high"]) == \
        (pytest.approx(0.3), pytest.approx(0.3))
    assert agg.loc["steady", f"{SIGNED}_abs"] == pytest.approx(0.05) and "val_loss_abs" not in agg  # not a signed metric
    front = query.pareto(trials, PERF, SIGNED, front_only=False).set_index("paradigm")
    assert front["on_front"].to_dict() == {"steady": True, "flipping": False}  # 0.05 from parity dominates 0.3
    assert list(query.front_table(trials, PERF, SIGNED).query("on_front")["paradigm"]) == ["steady"]
    pick = query.best(trials, PERF, SIGNED, max_drop=0.01)
    assert pick["paradigm"][0] == "steady" and pick[f"{SIGNED}_abs"][0] == pytest.approx(0.05)
    table = query.compare(trials, "paradigm", PERF, SIGNED, reference_group="steady").set_index("paradigm")
    assert table.loc["flipping", "rel_change"] == pytest.approx((0.3 - 0.05) / 0.05)  # mean |value|, not |mean|
    assert table.loc["flipping", SIGNED] == 0.0 and table.loc["flipping", f"{SIGNED}_abs_ci_high"] == pytest.approx(0.3)
    empty = query.pareto(trials.iloc[0:0], PERF, SIGNED)
    assert f"{SIGNED}_abs" in empty and f"{SIGNED}_abs_ci_low" in empty


def test_fairest_level_reads_a_signed_metric_by_its_mean_distance_from_parity():
    rows = [{"paradigm": "p", "intervention.magnitude": m, "seed": str(s), PERF: 0.8, SIGNED: t}
            for m, ts in ((0.5, (0.3, -0.3)), (0.9, (0.05, 0.05))) for s, t in enumerate(ts)]
    table = query.fairest_level(_frame(rows), PERF, SIGNED)
    assert table["fairest_intervention.magnitude"].tolist() == [0.9]
    assert table[f"{SIGNED}_abs"][0] == pytest.approx(0.05) and f"{SIGNED}_abs_ci_low" in table
    assert table["perf_cost"][0] == 0.0


@pytest.mark.parametrize("ask", [
    lambda t: query.compare(t, "paradigm", PERF, "worst_group_accuracy", select_on="test"),
    lambda t: query.fairest_level(t, PERF, "worst_group_accuracy"),
])
def test_a_fairness_metric_where_higher_is_better_is_refused(ask):
    trials = _frame([{"paradigm": p, "intervention.magnitude": m, "seed": "0", PERF: 0.8, "worst_group_accuracy": w}
                     for p, m, w in (("a", 0.5, 0.6), ("a", 0.9, 0.7), ("b", 0.5, 0.5))])
    with pytest.raises(query.QueryError, match="'worst_group_accuracy' is maximised.*lower is fairer"):
        ask(trials)


def test_compare_by_seed_needs_per_trial_rows():
    trials = _flipping_and_steady()
    with pytest.raises(query.QueryError, match="seeds are averaged within a configuration.*--per-trial"):
        query.compare(trials, "seed", PERF, SIGNED)
    table = query.compare(trials, "seed", PERF, SIGNED, by_config=False)
    assert table["seed"].tolist() == ["0", "1"]


def test_the_hypervolume_reference_is_the_worst_value_each_objective_can_take():
    from orchestrator import pareto as pareto_mod

    trials = _frame([{"paradigm": p, "intervention.magnitude": 0.5, "seed": "0", PERF: a, "fpr_ratio_deviation": d,
                      SIGNED: t} for p, a, d, t in (("a", 0.9, 1.5, -0.4), ("b", 0.8, 1.2, 0.2))])
    table = query.front_table(trials, PERF, "fpr_ratio_deviation")
    ref = query.hypervolume_reference(table, PERF, "fpr_ratio_deviation")
    assert ref == [0.0, 1.5]  # accuracy's lowest value; a deviation has no upper bound: the worst one here
    volume = pareto_mod.hypervolume(query._objective_values(table, [PERF, "fpr_ratio_deviation"]),
                                    ["max", "min"], ref)
    assert volume == pytest.approx(0.8 * 0.3)  # a fixed reference of 1.0 gives 0
    assert query.hypervolume_reference(query.front_table(trials, PERF, SIGNED), PERF, SIGNED) == [0.0, 1.0]
    assert query.hypervolume_reference(table.iloc[0:0], PERF, "fpr_ratio_deviation") == [0.0, 0.0]  # nothing yet


def test_a_quote_in_a_sweep_name_is_the_users_to_fix(store):
    r = _cli(store, "pareto", "a'b", "--experiment", "exp1")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "sweep name \"a'b\" contains a quote" in r.stderr and "Traceback" not in r.stderr


def test_figures_draw_a_signed_metric_by_its_distance_from_parity():
    from orchestrator import figures

    trials = _flipping_and_steady()
    fig = figures.pareto_figure(query.front_table(trials, PERF, SIGNED), PERF, SIGNED)
    ax = fig.axes[0]
    assert ax.get_xlabel() == f"|{SIGNED}| (unfairness)"
    points = {c.get_label(): list(c.lines[0].get_xdata()) for c in ax.containers}
    assert points == {"flipping": [pytest.approx(0.3)], "steady": [pytest.approx(0.05)]}  # where the front puts them
    (front,) = [line for line in ax.lines if line.get_label() == "Pareto front"]
    assert list(front.get_xdata()) == [pytest.approx(0.05)]
    per_trial = query.pareto(trials, PERF, SIGNED, by_config=False, front_only=False)
    ax = figures.pareto_figure(per_trial, PERF, SIGNED).axes[0]
    assert sorted(x for c in ax.containers for x in c.lines[0].get_xdata()) == pytest.approx([0.05, 0.05, 0.3, 0.3])
    ax = figures.axis_figure(trials, "intervention.magnitude", PERF, SIGNED).axes[0]
    assert {line.get_label(): list(line.get_ydata()) for line in ax.lines} == {
        "flipping": [pytest.approx(0.3)], "steady": [pytest.approx(0.05)]}  # |value| per trial, then the mean


def test_axis_figure_puts_each_level_at_one_position_for_every_paradigm():
    from orchestrator import figures

    rows = [{"paradigm": p, "intervention.magnitude": 0.5, "freeze_depth": f, "seed": "0", PERF: 0.8, FAIR: e}
            for p, levels in (("simclr", ("1", "linear", "full")), ("supervised", ("full",)))
            for f, e in zip(levels, (0.1, 0.2, 0.3))]
    fig = figures.axis_figure(_frame(rows), "freeze_depth", PERF, FAIR)
    order = ["1", "full", "linear"]  # figures._sorted_levels: freezing depths in Freeze's order
    for ax in fig.axes:
        assert [t.get_text() for t in ax.get_xticklabels()] == order and list(ax.get_xticks()) == [0, 1, 2]
        lines = {line.get_label(): line for line in ax.lines}
        assert list(lines["supervised"].get_xdata()) == [order.index("full")]
        assert list(lines["simclr"].get_xdata()) == [0, 1, 2]
    assert list({line.get_label(): line for line in fig.axes[0].lines}["simclr"].get_ydata()) == \
        pytest.approx([0.1, 0.3, 0.2])  # 1, full, linear


def test_the_launch_summary_line_reads_a_signed_probe_by_its_distance_from_parity():
    from orchestrator.report import front_story

    rows = [{"paradigm": p, "freeze_depth": "linear", "intervention.magnitude": 0.5, "seed": str(s), PERF: a, SIGNED: t}
            for p, a, ts in (("biased", 0.7, (0.3, -0.3)), ("supervised", 0.8, (0.05, -0.05))) for s, t in enumerate(ts)]
    line = front_story(_frame(rows), PERF, SIGNED)
    assert f"|{SIGNED}| of a linear probe on the biased base 0.300 (other bases: supervised 0.050)" in line


def test_the_reports_front_table_shows_what_a_signed_metric_is_compared_by(tmp_path):
    from orchestrator.report import _write_summary

    trials = _flipping_and_steady()
    table = query.front_table(trials, PERF, SIGNED)
    text = _write_summary(tmp_path / "summary.md", "s", "e", trials, table, PERF, SIGNED, pd.DataFrame(), 0.01,
                          "test").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| backbone"))
    assert header.endswith(f"| abs({SIGNED}) | abs({SIGNED}) 95% CI |")
    assert f"the front compares `abs({SIGNED})`" in text
    row = next(line for line in text.splitlines() if line.startswith("|") and "steady" in line)
    assert row.split("|")[-3].strip() == "0.0500"  # the steady configuration's mean distance from parity


def test_the_reports_pick_counts_the_seeds_its_means_are_over():
    from orchestrator.report import _seeds

    assert _seeds({"n_seeds": 3, "accuracy_count": 3, "eod_count": 2}, "accuracy", "eod") == "2 seed(s) of 3"
    assert _seeds({"n_seeds": 2, "accuracy_count": 2, "eod_count": 2}, "accuracy", "eod") == "2 seed(s)"
    assert _seeds({"n_seeds": 2}, "accuracy", "eod") == "2 seed(s)"  # a per-trial row has no counts


def test_fairest_level_breaks_a_tie_in_fairness_by_performance_whatever_the_row_order():
    rows = [{"paradigm": "p", "intervention.magnitude": m, "seed": "0", PERF: a, FAIR: e}
            for m, a, e in ((0.0, 0.70, 0.05), (0.5, 0.90, 0.05), (1.0, 0.95, 0.20))]
    for order in (rows, rows[::-1], [rows[1], rows[0], rows[2]]):
        table = query.fairest_level(_frame(order), PERF, FAIR)
        # 0.0 and 0.5 are equally fair: 0.5 costs 0.05 of accuracy, 0.0 would have cost 0.25
        assert table["fairest_intervention.magnitude"].tolist() == [0.5]
        assert table["perf_cost"][0] == pytest.approx(0.05)


def _flipping_and_steady_far() -> pd.DataFrame:
    """Two configurations: flipping's seeds sit at +0.3 and -0.3 (signed mean 0, 0.3 from parity), steady's at 0.25."""
    return _frame([{"paradigm": p, "intervention.magnitude": 0.5, "seed": str(s), PERF: a, SIGNED: v,
                    f"val_{PERF}": a, f"val_{SIGNED}": v}
                   for p, a, vs in (("flipping", 0.90, (0.3, -0.3)), ("steady", 0.80, (0.25, 0.25)))
                   for s, v in enumerate(vs)])


def test_a_pick_of_a_signed_fairness_metric_is_described_by_its_distance_from_parity(tmp_path):
    from orchestrator.report import _write_summary, front_story

    trials = _flipping_and_steady_far()
    line = front_story(trials, PERF, SIGNED, max_drop=0.2)
    # both are within 0.2 of the best: steady is 0.25 from parity, flipping 0.3, however its signed mean reads 0
    assert "steady" in line and f"|{SIGNED}| 0.250 [0.2500, 0.2500] (signed mean +0.250)" in line
    table = query.front_table(trials, PERF, SIGNED)
    best = query.best(trials, PERF, SIGNED, max_drop=0.2, select_on="val")
    text = _write_summary(tmp_path / "summary.md", "s", "e", trials, table, PERF, SIGNED, best, 0.2, "val").read_text()
    assert f"|{SIGNED}| 0.2500 [0.2500, 0.2500] (signed mean +0.2500) on test" in text
    plain = front_story(_frame([{"paradigm": "p", "intervention.magnitude": 0.5, "seed": "0", PERF: 0.8, FAIR: 0.1}]),
                        PERF, FAIR)
    assert f"{FAIR} 0.100 n/a (one seed)" in plain and "|" not in plain  # an unsigned metric as it is


def test_the_launch_summary_and_the_parent_run_show_a_signed_front_by_its_distance_from_parity(capsys, monkeypatch):
    import argparse
    from types import SimpleNamespace

    from orchestrator import cli
    from orchestrator.tracking import SweepTracker

    trials = _flipping_and_steady_far()
    front = query.front_table(trials, PERF, SIGNED)
    assert front["on_front"].all()  # flipping: better accuracy; steady: nearer parity
    spec = SimpleNamespace(objectives=SimpleNamespace(performance=PERF, fairness=SIGNED), name="s", experiment="e",
                           search=SimpleNamespace(type="grid"))
    result = SimpleNamespace(plan=SimpleNamespace(spec=spec), front=front, finished=4, failed=[], search_ended="",
                             experiment_path="/nowhere", parent_run_id="p", tracking_uri="sqlite:///none.db",
                             interrupted=False)
    monkeypatch.setattr(cli, "_front_story", lambda *a: "")  # its line is tested above; no store here
    cli._print_summary(result, argparse.Namespace(storage=None))
    out = capsys.readouterr().out
    assert f"|{SIGNED}|, the mean over seeds of each trial's distance from parity, min" in out
    header = next(line for line in out.splitlines() if "intervention.kind" in line.split())
    assert header.split()[-3:] == [f"{SIGNED}_abs", f"{SIGNED}_abs_ci_low", f"{SIGNED}_abs_ci_high"]
    flipping = next(line for line in out.splitlines() if "flipping" in line)
    assert "0.3000" in flipping  # its |value| mean, beside the signed mean 0.0000
    axes = SimpleNamespace(backbone=["b"], paradigm=["flipping", "steady"], freeze_depth=["linear"], seed=[0, 1],
                           intervention=[SimpleNamespace(kind="correlation", endpoints=lambda: (0.5,))])
    owner = SimpleNamespace(spec=SimpleNamespace(name="s", n_trials=4, axes=axes, dataset=SimpleNamespace(name="d")))
    note = SweepTracker._description(owner, front[front["on_front"]], PERF, SIGNED, 4)
    header = next(line for line in note.splitlines() if line.startswith("| paradigm"))
    assert header.endswith(f"| {SIGNED} | {SIGNED}_abs |")
    assert "| flipping | 0.5000 | 0 | 2 | 0.9000 | 0.0000 | 0.3000 |" in note  # signed mean 0, 0.3 from parity
