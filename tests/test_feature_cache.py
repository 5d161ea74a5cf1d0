"""The frozen-prefix feature cache: a trial whose frozen layers form a prefix (a linear probe, freeze depth k)
trained on cached prefix outputs is the same trial as the whole model - BatchNorm left training in the
suffix, dropout in the suffix and folder images included - the cache computes each key once across trials
and stays within its budget, and trials it cannot serve exactly run the whole model and say why."""
from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from orchestrator.launch import _trial_context
from orchestrator.plan import build_plan
from orchestrator.spec import Resources, parse_spec
from tests.helpers import TINY_DATA, tiny_spec, trial_config
from trainables import backbones
from trainables import feature_cache as fc
from trainables.data import fixtures as F
from trainables.finetune import TrialContext, train_and_evaluate
from trainables.trial import Freeze

FT = {"size": 200, "epochs": 3, "batch_size": 50, "lr": [0.02, 0.1], "weight_decay": 0.0, "momentum": 0.9,
      "threshold": "calibrated", "select_epoch": "best_val_loss"}
SHOWN = ("accuracy", "auroc", "equalized_odds_difference", "tpr_difference", "val_accuracy", "val_loss", "threshold",
         "selected_val_loss", "train_loss")
SERIES = {"n_source": 64, "n_finetune": 600, "n_val": 96, "n_test": 96, "length": 32}


def _point(backbone: str, freeze, seed: int = 0, magnitude: float = 0.7, **finetune):
    return trial_config({"backbone": backbone, "paradigm": "scratch", "intervention": "correlation",
                         "magnitude": magnitude, "freeze_depth": freeze, "seed": seed}, {**FT, **finetune})


def _context(cache: Path | None, dataset: str = "synthetic_images", options: dict | None = None) -> TrialContext:
    return TrialContext(dataset=dataset, dataset_options=dict(TINY_DATA if options is None else options),
                        cache_root="/none", bootstrap=0, feature_cache=str(cache) if cache else None)


def _same_trial(plain: dict, cached: dict) -> None:
    for name in SHOWN:
        assert cached[name] == pytest.approx(plain[name], abs=1e-5), name
    assert cached["chosen_hparams"] == plain["chosen_hparams"] and cached["selected_epoch"] == plain["selected_epoch"]


@pytest.mark.parametrize("backbone", ["test_resnet", "test_convnext"])
def test_a_linear_probe_on_cached_features_is_the_same_trial(tmp_path, backbone):
    plain = train_and_evaluate(_point(backbone, "linear"), _context(None))
    cached = train_and_evaluate(_point(backbone, "linear"), _context(tmp_path / "fc"))
    assert plain["feature_cache"].startswith("off") and cached["feature_cache"] == "linear probe on cached pre-logits"
    _same_trial(plain, cached)
    assert len(list((tmp_path / "fc").glob("*.npy"))) == 3  # finetuning pool, val, test


@pytest.mark.parametrize("backbone, freeze, dataset, options, cut", [
    ("test_resnet", 2, "synthetic_images", TINY_DATA, "layer1"),  # BatchNorm of layers 2-4 trains (batch statistics)
    ("test_resnet", 1, "synthetic_images", TINY_DATA, "maxpool"),  # the stem's activation and pooling are cached
    ("test_convnext", 3, "synthetic_images", TINY_DATA, "stages_1"),
    ("cnn1d_tiny", 1, "synthetic_timeseries", SERIES, "stem"),  # dropout (p 0.1) in the two blocks that train
    ("cnn1d_paperb", "linear", "synthetic_timeseries", SERIES, "amax"),  # dropout (p 0.6) inside the dense head
])
def test_partial_freezing_on_cached_prefix_outputs_is_the_same_trial(tmp_path, backbone, freeze, dataset, options, cut):
    plain = train_and_evaluate(_point(backbone, freeze), _context(None, dataset, options))
    cached = train_and_evaluate(_point(backbone, freeze), _context(tmp_path / "fc", dataset, options))
    assert cached["feature_cache"].endswith(f"on cached outputs of {cut}") or (
        freeze == "linear" and cached["feature_cache"] == fc.LINEAR_PROBE_NOTE), cached["feature_cache"]
    _same_trial(plain, cached)


def test_folder_images_on_cached_prefix_outputs_are_the_same_trial(tmp_path):
    """Streamed folder data: the cached trial visits the finetuning rows in the loader's (seed, epoch) order."""
    opts = {**F.write_image_csv(tmp_path / "csv", n=600), "num_workers": 0}
    plain = train_and_evaluate(_point("test_resnet", 2, size=60, batch_size=16), _context(None, "image_csv", opts))
    cached = train_and_evaluate(_point("test_resnet", 2, size=60, batch_size=16),
                                _context(tmp_path / "fc", "image_csv", opts))
    assert cached["feature_cache"] == "first 2 of 5 layer groups on cached outputs of layer1"
    _same_trial(plain, cached)


def test_later_trials_on_the_same_prefix_compute_nothing(tmp_path, monkeypatch):
    """Other magnitudes, sizes and the inner search's candidates read the cached prefix outputs; another random
    initialisation (seed, for scratch) or another freezing depth is another key."""
    calls = []
    compute = fc.compute_features
    monkeypatch.setattr(fc, "compute_features", lambda *a, **k: calls.append(1) or compute(*a, **k))
    cache = tmp_path / "fc"
    first = train_and_evaluate(_point("test_resnet", 2), _context(cache))  # two lr candidates: one plan each
    assert first["feature_cache"].startswith("first 2 of 5") and len(calls) == 3  # finetuning pool, val, test
    stamps = {p.name: p.stat().st_size for p in cache.glob("*.npy")}
    other = train_and_evaluate(_point("test_resnet", 2, magnitude=0.9, size=120), _context(cache))
    assert other["feature_cache"] == first["feature_cache"] and len(calls) == 3  # no prefix computed again
    assert {p.name: p.stat().st_size for p in cache.glob("*.npy")} == stamps
    train_and_evaluate(_point("test_resnet", 2, seed=1), _context(cache))  # another random initialisation
    train_and_evaluate(_point("test_resnet", "linear"), _context(cache))  # another prefix
    assert len(calls) == 9 and len(list(cache.glob("*.npy"))) == 9


def test_trials_the_cache_cannot_serve_exactly_run_the_whole_model(tmp_path, monkeypatch):
    cache = tmp_path / "fc"
    assert train_and_evaluate(_point("test_resnet", 0), _context(cache))["feature_cache"] == "off (nothing is frozen)"
    scattered = train_and_evaluate(_point("test_resnet", [1, 2]), _context(cache))
    assert scattered["feature_cache"] == "off (frozen groups [1, 2] are not a prefix of the network)"
    # the budget a sweep sets (resources.feature_cache_gb), as launch hands it to the trials
    plan = build_plan(parse_spec(tiny_spec(**{"resources.feature_cache_gb": 0.005})))
    small = replace(_trial_context(plan, "/none", feature_cache=str(cache)), dataset_options=dict(TINY_DATA),
                    bootstrap=0)
    assert small.feature_cache_bytes == 5_368_709
    big = train_and_evaluate(_point("test_resnet", 2), small)  # layer1's outputs of 1,200 rows take 9 MiB
    assert big["feature_cache"] == ("off (the outputs of layer1 take 9 MiB, more than the feature cache's budget "
                                    "of 5 MiB)")
    assert not list(cache.glob("*.npy"))
    assert Resources().feature_cache_bytes == fc.DEFAULT_BUDGET_BYTES  # the spec's default is the module's


class _Stack(nn.Module):
    """stem -> mid -> block -> head, with ``mid`` between the two layer groups."""

    def __init__(self, mid: nn.Module):
        super().__init__()
        self.stem, self.mid, self.block, self.head = nn.Linear(6, 8), mid, nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.block(self.mid(self.stem(x))))

    def group_matcher(self, coarse: bool = False):
        return {"stem": r"^stem", "blocks": [(r"^block", (1,))]}

    def get_classifier(self):
        return self.head


def _plan(model: nn.Module, depth: int):
    groups = backbones.layer_groups(model)
    info = backbones.apply_freeze(model, groups, Freeze.parse(depth))
    return fc.plan_prefix(model, info.n_groups, info.frozen_groups, info.frozen_modules, torch.randn(8, 6),
                          contextlib.nullcontext, lambda: backbones.set_train_mode(model, info))


@pytest.mark.parametrize("mid, why", [
    (nn.Dropout(0.5), "mid (Dropout, which trains or acts differently in training) comes before the last frozen layer"),
    (nn.BatchNorm1d(8, affine=False),  # no parameters, but batch statistics in training
     "mid (BatchNorm1d, which trains or acts differently in training) comes before the last frozen layer"),
    (nn.Dropout(0.0), ""),  # acts alike: cached with the prefix
])
def test_a_prefix_never_swallows_what_acts_differently_in_training(mid, why):
    plan, note = _plan(_Stack(mid), 2)
    assert (plan is None and note == why) if why else (plan.cut == "block" and note == fc.LINEAR_PROBE_NOTE)


def test_the_suffix_trains_its_dropout_and_batchnorm_as_the_whole_model_does():
    torch.manual_seed(0)
    model = _Stack(nn.Sequential(nn.Dropout(0.5), nn.BatchNorm1d(8)))
    plan, note = _plan(model, 1)
    assert plan.cut == "stem" and note == "first 1 of 3 layer groups on cached outputs of stem"
    x, stats = torch.randn(8, 6), model.mid[1].running_mean.clone()
    assert torch.equal(model.mid[1].running_mean, stats)  # the plan's own check left the statistics as found
    plan.suffix.train()
    assert model.training and not model.stem.training and model.mid.training
    torch.manual_seed(1)
    whole = model(x)  # dropout draws, batch statistics
    whole_stats = model.mid[1].running_mean.clone()
    model.mid[1].running_mean.copy_(stats)
    torch.manual_seed(1)
    split = plan.suffix(plan.prefix(x))
    assert torch.equal(whole, split) and torch.equal(model.mid[1].running_mean, whole_stats)
    plan.suffix.eval()
    assert not model.training and not model.mid.training


def test_the_cache_computes_a_key_once_and_evicts_the_least_recently_used(tmp_path):
    calls = []

    def make(value: float, rows: int = 1000):
        def compute():
            calls.append(value)
            return np.full((rows, 64), value, dtype=np.float32)  # 256 KB
        return compute

    cache = fc.FeatureCache(tmp_path, budget_bytes=600_000)  # room for two entries
    a = cache.get_or_compute("a", make(1.0))
    assert cache.get_or_compute("a", make(9.0))[0, 0] == 1.0 and calls == [1.0]  # computed once
    assert not a.flags.writeable  # memory-mapped read-only: trials cannot corrupt each other's features
    cache.get_or_compute("b", make(2.0))
    cache.get_or_compute("a", make(1.0))  # a read: now the most recently used
    cache.get_or_compute("c", make(3.0))  # over budget: b, the least recently used, goes
    left = list(tmp_path.glob("*.npy"))
    assert sorted(p.stem for p in left) == ["a", "c"] and sum(p.stat().st_size for p in left) <= 600_000
    assert not list(tmp_path.glob("*.tmp"))


def test_a_base_rebuilt_under_its_key_is_read_again_and_gets_its_own_features(tmp_path):
    """A damaged base, or one trained in another precision, is rebuilt under the same pretraining key, with other
    weights on a GPU. A long-lived worker must not serve the old build from memory, nor the feature cache the
    old build's prefix outputs: the trial on the rebuilt base is the trial an uncached, fresh run gives."""
    from trainables import worker_cache
    from trainables.pretrain_cache import PretrainCache

    bases = PretrainCache(tmp_path / "bases")

    def write_base(seed: int) -> None:
        torch.manual_seed(seed)
        model = backbones.create_backbone("test_resnet", num_classes=2, input_shape=(3, 32, 32))
        bases.write("base-k", {k: v.contiguous() for k, v in model.state_dict().items()}, {"seed": seed})

    def run(cache: Path | None) -> dict:
        point = trial_config({"backbone": "test_resnet", "paradigm": "supervised", "intervention": "correlation",
                              "magnitude": 0.7, "freeze_depth": "linear", "seed": 0}, FT, weights_key="base-k")
        context = replace(_context(cache), cache_root=str(tmp_path / "bases"))
        return train_and_evaluate(point, context)

    write_base(1)
    first = run(tmp_path / "fc")
    assert len(list((tmp_path / "fc").glob("*.npy"))) == 3
    write_base(2)  # rebuilt: same key, other weights
    rebuilt = run(tmp_path / "fc")
    assert len(list((tmp_path / "fc").glob("*.npy"))) == 6  # the old build's features are not reused
    worker_cache._WEIGHTS.clear()
    _same_trial(run(None), rebuilt)  # what a fresh process on the rebuilt base computes, without the cache
    assert rebuilt["val_loss"] != pytest.approx(first["val_loss"], abs=1e-6)
