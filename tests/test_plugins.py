"""Plugins: a module named under ``plugins:`` registers its own dataset, paradigm, metric and sampler with one
decorator each; the driver imports it before validating the file and every Ray worker before a trial or a
pretraining job, so a sweep uses them end to end without a fork. One that cannot be imported is exit 2
naming the module and the error."""
from __future__ import annotations

import os
import sys

import mlflow
import pytest

from orchestrator.plan import build_plan
from orchestrator.samplers import SAMPLERS
from orchestrator.spec import SpecError, parse_spec
from tests.helpers import cli_env, run_cli, sqlite_uri, tiny_spec, write_spec
from trainables.data import DATASETS
from trainables.metrics import METRICS, unregister_metric
from trainables.paradigms import PARADIGMS

TOY_PLUGIN = '''"""A toy fairsweep plugin: a dataset, a paradigm, a metric and a sampler, one decorator each."""
from orchestrator.samplers import SAMPLERS
from trainables.data import DATASETS, build_dataset
from trainables.metrics import register_metric
from trainables.paradigms import PARADIGMS
from trainables.schema import Option


@DATASETS.register("toy_images", options=DATASETS.get("synthetic_images").options, doc="synthetic_images, renamed")
def toy_images(options):
    return build_dataset("synthetic_images", options)


@PARADIGMS.register("toy_shrunk", doc="a random backbone with every weight multiplied by scale",
                    options={"scale": Option(0.5, doc="the factor", low=0.0, low_open=True)})
def shrunk(paradigm, ctx):
    import torch

    from trainables import backbones

    model = backbones.create_backbone(ctx.backbone, num_classes=2, input_shape=ctx.dataset.input_shape)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(ctx.options["scale"])
    return model, [1.0]


@register_metric("toy_error_rate", direction="min", per_attribute=False)
def toy_error_rate(c):
    return (c.fp + c.fn) / c.n


@SAMPLERS.register("toy_random")
def toy_random(seed):
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)
'''

PLUGIN_SPEC = {"plugins": ["toyplug"], "dataset.name": "toy_images", "axes.paradigm": ["scratch", "toy_shrunk"],
               "axes.intervention": {"kind": "correlation", "magnitudes": [0.5]}, "axes.freeze_depth": ["linear"],
               "objectives.fairness": "toy_error_rate", "pretraining.paradigms": {"toy_shrunk": {"scale": 0.5}},
               "finetune.epochs": 1}


@pytest.fixture
def plugin_dir(tmp_path):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "toyplug.py").write_text(TOY_PLUGIN)
    (tmp_path / "plugins" / "brokenplug.py").write_text("import a_module_nobody_installed_xyz\n")
    return tmp_path / "plugins"


@pytest.fixture
def imported_here(plugin_dir, monkeypatch):
    """The plugin importable in this process; what it registers is removed again afterwards."""
    monkeypatch.syspath_prepend(str(plugin_dir))
    yield
    for registry, name in ((DATASETS, "toy_images"), (PARADIGMS, "toy_shrunk"), (SAMPLERS, "toy_random")):
        if name in registry:
            registry.unregister(name)
    if "toy_error_rate" in METRICS:
        unregister_metric("toy_error_rate")
    sys.modules.pop("toyplug", None)


def _env(plugin_dir) -> dict[str, str]:
    """The CLI's environment with the plugin on PYTHONPATH: Ray's local workers inherit it."""
    return cli_env(PYTHONPATH=os.pathsep.join(p for p in (str(plugin_dir), os.environ.get("PYTHONPATH")) if p))


def test_a_plugins_names_count_in_validation_and_the_plan(imported_here):
    with pytest.raises(SpecError, match="expected one of: tpe, nsga2, random"):
        parse_spec(tiny_spec(**{"search": {"type": "optuna", "budget": 4, "sampler": "toy_random"}}))
    spec = parse_spec(tiny_spec(**PLUGIN_SPEC, search={"type": "optuna", "budget": 2, "sampler": "toy_random"}))
    assert spec.plugins == ("toyplug",) and spec.dataset.name == "toy_images" and spec.search.sampler == "toy_random"
    plan = build_plan(spec)
    (job,) = plan.pretrain_jobs
    assert (job.backbone, job.paradigm, job.dataset) == ("test_resnet", "toy_shrunk", "toy_images")
    with pytest.raises(SpecError) as info:  # the plugin's options are checked like a built-in's
        build_plan(parse_spec(tiny_spec(**{**PLUGIN_SPEC, "pretraining.paradigms": {"toy_shrunk": {"scale": 0}}})))
    assert info.value.path == "pretraining.paradigms.toy_shrunk.scale" and "must be > 0.0 (the factor)" in str(info.value)


def test_a_module_that_cannot_be_imported_is_an_error_naming_it(plugin_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_dir))
    with pytest.raises(SpecError) as info:
        parse_spec(tiny_spec(plugins=["no_such_plugin_xyz"]))
    assert info.value.path == "plugins[0]"
    assert "'no_such_plugin_xyz' cannot be imported: ModuleNotFoundError" in str(info.value)
    with pytest.raises(SpecError) as info:
        parse_spec(tiny_spec(plugins=["brokenplug"]))
    assert "'brokenplug' cannot be imported" in str(info.value) and "a_module_nobody_installed_xyz" in str(info.value)
    sys.modules.pop("brokenplug", None)


def test_the_cli_exits_2_naming_the_plugin_and_its_import_error(tmp_path, plugin_dir):
    spec = write_spec(tmp_path, tiny_spec(plugins=["toyplug", "brokenplug"]))
    out = run_cli("validate", str(spec), cwd=tmp_path, env=_env(plugin_dir), timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.startswith(f"fairsweep: error: {spec}: plugins[1]: got 'brokenplug'; plugin module 'brokenplug' "
                                 "cannot be imported: ModuleNotFoundError: No module named "
                                 "'a_module_nobody_installed_xyz'"), out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_a_sweep_uses_a_plugins_dataset_paradigm_and_metric_end_to_end(tmp_path, plugin_dir):
    """Real CLI, local Ray, SQLite MLflow: the workers build the plugin's dataset, pretrain with its paradigm and
    report its metric, which is the sweep's fairness objective."""
    spec = write_spec(tmp_path, tiny_spec(**PLUGIN_SPEC))
    uri = sqlite_uri(tmp_path)
    out = run_cli("launch", str(spec), "--tracking-uri", uri, "--storage", str(tmp_path / "results"), "--quiet",
                  cwd=tmp_path, env=_env(plugin_dir), timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["tiny"])
    trials = runs[runs["tags.fairsweep.kind"] == "trial"]
    pretrain = runs[runs["tags.fairsweep.kind"] == "pretrain"]
    assert len(trials) == 2 and (trials["status"] == "FINISHED").all()
    assert set(trials["params.paradigm"]) == {"scratch", "toy_shrunk"}
    assert len(pretrain) == 1 and pretrain["status"].iloc[0] == "FINISHED"
    errors = trials["metrics.toy_error_rate"]  # computed in the workers, by the plugin's function
    assert errors.notna().all() and ((errors >= 0) & (errors <= 1)).all()
    assert (errors - (1 - trials["metrics.accuracy"])).abs().max() < 1e-9


def test_the_errors_a_worker_raises_for_a_missing_or_refused_name_reach_the_driver_intact():
    """Ray pickles a worker's exception; one that cannot be rebuilt arrives as UnserializableException."""
    import pickle

    from trainables.data import DatasetOptionError
    from trainables.plugins import PluginError
    from trainables.registry import UnknownNameError

    for err in (UnknownNameError("paradigm", "toy_shrunk", ["scratch", "supervised"]),
                DatasetOptionError("n_test", 3, "must be >= 4"), PluginError("plugin module 'x' cannot be imported")):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err)
    assert pickle.loads(pickle.dumps(UnknownNameError("paradigm", "toy", ["scratch"]))).valid == ["scratch"]
    assert pickle.loads(pickle.dumps(DatasetOptionError("n_test", 3, "no"))).key == "n_test"
