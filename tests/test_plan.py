"""Plan-time checks (names, feasibility, freeze depths) and the CLI's dry run / exit codes."""
from __future__ import annotations

import pytest

from orchestrator.plan import build_plan
from orchestrator.spec import SpecError, parse_spec
from tests.helpers import run_cli, tiny_spec, write_spec
from trainables.trial import Freeze


def test_plan_counts_keys_and_dedups_pretraining():
    plan = build_plan(parse_spec(tiny_spec(**{"axes.backbone": ["test_resnet", "test_convnext"], "axes.seed": [0, 1]})))
    assert len(plan.trials) == 2 * 2 * 2 * 2 * 2
    # scratch needs no job; supervised needs one per backbone, shared by all its trials
    assert sorted((j.backbone, j.paradigm) for j in plan.pretrain_jobs) == [("test_convnext", "supervised"), ("test_resnet", "supervised")]
    assert len({t.key for t in plan.trials}) == len(plan.trials)
    # repeats over seeds share a config key, nothing else does
    assert len({t.config_key for t in plan.trials}) == len(plan.trials) // 2
    supervised = [t for t in plan.trials if t.point.paradigm == "supervised" and t.point.backbone == "test_resnet"]
    assert {t.config.weights.key for t in supervised} == {j.key for j in plan.pretrain_jobs if j.backbone == "test_resnet"}
    linear = next(t for t in plan.trials if t.point.freeze_depth == Freeze("linear") and t.point.backbone == "test_resnet")
    assert linear.frozen_groups == tuple(range(plan.layer_groups["test_resnet"]))


def test_keys_are_stable_and_change_with_the_config():
    a = build_plan(parse_spec(tiny_spec()))
    b = build_plan(parse_spec(tiny_spec()))
    assert [t.key for t in a.trials] == [t.key for t in b.trials]
    c = build_plan(parse_spec(tiny_spec(**{"finetune.lr": 0.03})))
    assert not {t.key for t in a.trials} & {t.key for t in c.trials}
    assert [j.key for j in a.pretrain_jobs] == [j.key for j in c.pretrain_jobs]  # finetuning lr does not touch pretraining
    d = build_plan(parse_spec(tiny_spec(**{"pretraining.epochs": 2})))
    assert [j.key for j in a.pretrain_jobs] != [j.key for j in d.pretrain_jobs]


def test_precision_keys_the_bases_apart_and_is_checked():
    """A base trained in bf16 is not the fp32 one (bf16 learns differently on some models: README, "GPUs"). A job
    computes in bf16 only on a GPU with resources.precision bf16 (the default): that enters its key; CPU sweeps and
    fp32 GPU sweeps compute the same and keep the keys they had before the option existed."""
    def plan(**resources):
        return build_plan(parse_spec(tiny_spec(**{f"resources.{k}": v for k, v in resources.items()})))

    cpu, cpu_fp32 = plan(), plan(precision="fp32")
    gpu_bf16, gpu_fp32 = plan(gpus_per_trial=0.5), plan(gpus_per_trial=0.5, precision="fp32")
    assert cpu.spec.resources.precision == "bf16" and cpu.pretrain_jobs[0].hparams.precision == "fp32"
    assert [j.key for j in cpu.pretrain_jobs] == [j.key for j in cpu_fp32.pretrain_jobs] == \
        [j.key for j in gpu_fp32.pretrain_jobs] and "precision" not in cpu.pretrain_jobs[0].to_dict()["hparams"]
    assert [j.hparams.precision for j in gpu_bf16.pretrain_jobs] == ["bf16"]
    assert not {j.key for j in cpu.pretrain_jobs} & {j.key for j in gpu_bf16.pretrain_jobs}
    supervised = [t for t in gpu_bf16.trials if t.point.paradigm == "supervised"]
    assert {t.config.weights.key for t in supervised} == {gpu_bf16.pretrain_jobs[0].key}
    with pytest.raises(SpecError, match=r"resources.precision: got 'fp16'; expected one of: bf16, fp32"):
        parse_spec(tiny_spec(**{"resources.precision": "fp16"}))


@pytest.mark.parametrize("overrides, path, fragment", [
    ({"axes.freeze_depth": [9]}, "axes.freeze_depth[0]", "exceeds"),
    ({"axes.freeze_depth": [[0, 7]]}, "axes.freeze_depth[0]", "test_resnet"),
    ({"axes.backbone": ["test_resnt"]}, "axes.backbone[0]", "test_resnet"),
    ({"axes.paradigm": ["supervized"]}, "axes.paradigm[0]", "supervised"),
    ({"axes.intervention": {"kind": "corelation", "magnitudes": [0.5]}}, "axes.intervention[0].kind", "correlation"),
    ({"axes.intervention": {"kind": "correlation", "magnitudes": [1.0]}, "finetune.size": 600}, "axes.intervention[0].magnitudes", "max"),
    ({"objectives.fairness": "equalised_odds"}, "objectives.fairness", "equalized_odds_difference"),
    ({"dataset.name": "synthetic_imgs"}, "dataset.name", "synthetic_images"),
    ({"dataset.options": {"n_tset": 5}}, "dataset.options.n_tset", "did you mean 'n_test'"),
    ({"axes.paradigm": ["file:/nonexistent/weights.pt"]}, "axes.paradigm[0]", "/nonexistent/weights.pt"),
])
def test_plan_time_errors_name_field_and_fix(overrides, path, fragment):
    with pytest.raises(SpecError) as info:
        build_plan(parse_spec(tiny_spec(**overrides)))
    assert info.value.path == path
    assert fragment in str(info.value)


def test_cli_dry_run_prints_plan_and_starts_nothing(tmp_path):
    spec = write_spec(tmp_path, tiny_spec())
    out = run_cli("launch", str(spec), "--dry-run", cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "trials: 8" in out.stdout and "pretraining jobs: 1" in out.stdout
    assert '"backbone": "test_resnet"' in out.stdout
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "fairsweep_results").exists()


def test_cli_bad_spec_exits_2_and_writes_nothing(tmp_path):
    spec = write_spec(tmp_path, tiny_spec(**{"axes.freeze_depth": [0, 42]}))
    out = run_cli("launch", str(spec), cwd=tmp_path, timeout=120)
    assert out.returncode == 2
    assert "axes.freeze_depth[1]" in out.stderr and "42" in out.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "fairsweep_results").exists()


def test_relative_dataset_root_becomes_absolute_in_plan_and_record(tmp_path, monkeypatch):
    from trainables.data.fixtures import write_image_csv

    options = {**write_image_csv(tmp_path / "lesions"), "root": "lesions", "image_size": 32}
    monkeypatch.chdir(tmp_path)
    spec = tiny_spec(**{"dataset": {"name": "image_csv", "options": options},
                        "axes.paradigm": ["scratch"], "axes.intervention": {"kind": "none", "magnitudes": [0.5]},
                        "finetune.size": 8})
    plan = build_plan(parse_spec(spec))
    assert plan.spec.dataset.options["root"] == str(tmp_path / "lesions")
    assert plan.spec.source["dataset"]["options"]["root"] == str(tmp_path / "lesions")  # what resume reads


@pytest.mark.parametrize("layout", ["image_csv", "timeseries_arrays"])
def test_files_named_under_root_stay_under_root(tmp_path, monkeypatch, layout):
    """``csv``/``arrays``/``metadata`` are relative to ``root``, not the working directory: after the
    plan (and from another directory, as a trial or a resume runs) the data still loads."""
    from trainables.data import build_dataset
    from trainables.data.fixtures import write_image_csv, write_timeseries_arrays

    if layout == "image_csv":
        options = {**write_image_csv(tmp_path / "data"), "csv": "metadata.csv", "image_size": 32}
    else:
        options = {**write_timeseries_arrays(tmp_path / "data"), "arrays": "arrays.npz"}
    options["root"] = "data"
    monkeypatch.chdir(tmp_path)
    spec = tiny_spec(**{"dataset": {"name": layout, "options": options}, "axes.backbone": ["cnn1d_tiny"] if
                        layout == "timeseries_arrays" else ["test_resnet"], "axes.paradigm": ["scratch"],
                        "axes.intervention": {"kind": "none", "magnitudes": [0.5]}, "finetune.size": 8})
    plan = build_plan(parse_spec(spec))
    recorded = plan.spec.source["dataset"]["options"]
    assert recorded["root"] == str(tmp_path / "data")
    for key in ("csv", "arrays", "metadata"):
        if key in options and key != "root":
            assert recorded[key] == options[key]  # still relative: it follows the absolute root
    elsewhere = tmp_path / "trial_dir"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert len(build_dataset(layout, plan.spec.dataset.options).meta("test").labels) > 0
    build_plan(parse_spec(plan.spec.source))  # what resume does with the recorded spec


def test_objective_attribute_must_exist():
    with pytest.raises(SpecError, match="no sensitive attribute 'sex'; it has: group"):
        build_plan(parse_spec(tiny_spec(**{"objectives.fairness": "equalized_odds_difference/sex"})))
    plan = build_plan(parse_spec(tiny_spec(**{"objectives.fairness": "worst:equalized_odds_difference"})))
    assert plan.spec.objectives.fairness == "worst:equalized_odds_difference"


def test_the_installed_console_script_runs(tmp_path):
    """``pip install`` put a ``fairsweep`` command beside the interpreter; it answers without Ray."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.helpers import REPO, cli_env

    exe = Path(sys.executable).parent / "fairsweep"
    assert exe.exists(), f"no console script at {exe}; install the package (pip install -e .)"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, env=cli_env(), timeout=60)
    assert out.returncode == 0 and all(c in out.stdout for c in ("launch", "resume", "status", "pareto", "best", "compare"))
    out = subprocess.run([str(exe), "validate", str(REPO / "sweeps" / "quickstart.yaml")], capture_output=True, text=True,
                         env=cli_env(), timeout=120, cwd=tmp_path)
    assert out.returncode == 0 and "trials: 36" in out.stdout


def test_a_relative_file_checkpoint_resolves_against_the_launch_directory(tmp_path, monkeypatch):
    import torch

    from trainables import backbones

    launch_dir, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    launch_dir.mkdir()
    elsewhere.mkdir()
    model = backbones.create_backbone("test_resnet", num_classes=2, input_shape=(3, 32, 32))
    torch.save(backbones.backbone_state_dict(model), launch_dir / "base.pt")
    spec = parse_spec(tiny_spec(**{"axes.paradigm": ["scratch", "file:base.pt"]}))
    monkeypatch.chdir(launch_dir)
    assert build_plan(spec).file_weights == {"file:base.pt": str(launch_dir / "base.pt")}
    monkeypatch.chdir(elsewhere)  # a resume run from another directory
    with pytest.raises(SpecError, match="axes.paradigm"):
        build_plan(spec)
    assert build_plan(spec, base_dir=str(launch_dir)).file_weights == {"file:base.pt": str(launch_dir / "base.pt")}
