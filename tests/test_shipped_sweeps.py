"""Every sweep file shipped under sweeps/ passes ``fairsweep launch --dry-run`` as written; files whose data
lives on disk (a ``root`` option) are checked on a fixture copy of their layout at that root, and only the
root and the finetuning size (the fixtures are small) change. Paper B's study is checked in detail."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, write_spec
from trainables.data import fixtures as F

SHIPPED = sorted((REPO / "sweeps").glob("*.yaml"))


def _celeba_columns(options: dict) -> tuple[str, ...]:
    """The attributes a CelebA sweep reads (target, sensitive, extra labels), the fixture's layout at least."""
    named = [options.get("target", "Blond_Hair"), *options.get("sensitive", ["Male"]), *options.get("extra_labels", [])]
    return tuple(dict.fromkeys([*named, *F.CELEBA_ATTRIBUTES]))


FIXTURES = {  # dataset -> writer of a small copy of its layout
    "celeba": lambda root, o: F.write_celeba(root, n=5 * 2 ** len(_celeba_columns(o)), attributes=_celeba_columns(o)),
    "waterbirds": lambda root, o: F.write_waterbirds(root),
    "image_csv": lambda root, o: F.write_image_csv(root),
    "timeseries_arrays": lambda root, o: F.write_timeseries_arrays(root, n=480, length=64,
                                                                   channels_last=bool(o.get("channels_last"))),
}


@pytest.fixture
def cli_main(monkeypatch):
    """``cli.main`` in this process, with the environment it may touch restored afterwards."""
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from orchestrator import cli

    return cli.main


def _runnable_copy(path: Path, tmp: Path) -> Path:
    raw = yaml.safe_load(path.read_text())
    options = raw["dataset"].get("options") or {}
    if "root" not in options:
        return path
    name = raw["dataset"]["name"]
    assert name in FIXTURES, f"{path.name}: no fixture layout for dataset {name!r}; add one to FIXTURES"
    FIXTURES[name](tmp / "data", options)
    options["root"] = str(tmp / "data")
    raw["finetune"] = {**(raw.get("finetune") or {}), "size": 10}
    if "finetune_size" in raw["axes"]:
        raw["axes"]["finetune_size"] = [10]
        raw["finetune"].pop("size")
    return write_spec(tmp, raw, path.name)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_sweep_passes_a_dry_run(path: Path, tmp_path: Path, cli_main, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code = cli_main(["launch", str(_runnable_copy(path, tmp_path)), "--dry-run"])
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    assert "trials" in out.out
    assert not os.listdir(tmp_path) or set(os.listdir(tmp_path)) <= {"data", path.name}  # nothing started


def test_paper_b_study_is_supervised_vs_simclr_over_paper_b_freezing_setups_and_three_attributes() -> None:
    from orchestrator.plan import build_plan
    from orchestrator.spec import load_spec
    from trainables.data import build_dataset

    spec = load_spec(REPO / "sweeps" / "paper_b_timeseries.yaml")
    plan = build_plan(spec)
    assert spec.axes.backbone == ("cnn1d_paperb",) and set(spec.axes.paradigm) == {"supervised", "simclr"}
    assert spec.tracking.log_models == "all"  # fairsweep cka needs every trial's weights
    frozen = {tuple(t.frozen_groups) for t in plan.trials}
    # nothing, first, middle, first two, first and last, all three (train_model_freeze_alternatives.py)
    assert frozen == {(), (0,), (1,), (0, 1), (0, 2), (0, 1, 2)}
    assert len(plan.trials) == 2 * 6 * len(spec.axes.seed) and len(spec.axes.seed) >= 3
    assert {j.paradigm for j in plan.pretrain_jobs} == {"supervised", "simclr"}
    data = build_dataset(spec.dataset.name, spec.dataset.options)
    assert len(data.meta("test").attributes) >= 3
    simclr = spec.pretraining.paradigms["simclr"]
    assert simclr["temperature"] == 0.1 and simclr["augmentations"] == "scale,negate"
