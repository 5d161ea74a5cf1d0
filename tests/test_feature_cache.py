"""The frozen-prefix feature cache: a linear probe trained on cached pre-logits gives the same trial as the
whole model, the cache computes each key once across trials and stays within its budget, and trials it
cannot serve exactly (layers that train, dropout before the classifier) run the whole model."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import TINY_DATA
from trainables import backbones, loop
from trainables.feature_cache import FeatureCache, probe_plan
from trainables.finetune import TrialContext, train_and_evaluate

FT = {"size": 200, "epochs": 3, "batch_size": 50, "lr": [0.02, 0.1], "weight_decay": 0.0, "momentum": 0.9,
      "threshold": "calibrated", "select_epoch": "best_val_loss"}
SHOWN = ("accuracy", "auroc", "equalized_odds_difference", "tpr_difference", "val_accuracy", "val_loss", "threshold",
         "selected_val_loss")


def _point(backbone: str, freeze, seed: int = 0, magnitude: float = 0.7) -> dict:
    return {"backbone": backbone, "paradigm": "scratch", "intervention": "correlation", "magnitude": magnitude,
            "freeze_depth": freeze, "seed": seed}


def _context(cache: Path | None) -> TrialContext:
    return TrialContext(dataset="synthetic_images", dataset_options=dict(TINY_DATA), finetune=FT, cache_root="/none",
                        bootstrap=0, feature_cache=str(cache) if cache else None)


@pytest.mark.parametrize("backbone", ["test_resnet", "test_convnext"])
def test_a_linear_probe_on_cached_features_is_the_same_trial(tmp_path, backbone):
    plain = train_and_evaluate(_point(backbone, "linear"), _context(None))
    cached = train_and_evaluate(_point(backbone, "linear"), _context(tmp_path / "fc"))
    assert plain["feature_cache"].startswith("off") and cached["feature_cache"] == "linear probe on cached pre-logits"
    for name in SHOWN:
        assert cached[name] == pytest.approx(plain[name], abs=1e-5), name
    assert cached["chosen_hparams"] == plain["chosen_hparams"] and cached["selected_epoch"] == plain["selected_epoch"]
    assert len(list((tmp_path / "fc").glob("*.npy"))) == 3  # finetuning pool, val, test


def test_the_cache_serves_other_magnitudes_and_sizes_without_recomputing(tmp_path):
    cache = tmp_path / "fc"
    train_and_evaluate(_point("test_resnet", "linear"), _context(cache))
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.npy")}
    other = train_and_evaluate(_point("test_resnet", "linear", magnitude=0.9),
                               replace(_context(cache), finetune={**FT, "size": 120}))
    assert other["feature_cache"] == "linear probe on cached pre-logits"
    assert {p.name for p in cache.glob("*.npy")} == set(stamps)  # same keys, nothing new written
    new_seed = train_and_evaluate(_point("test_resnet", "linear", seed=1), _context(cache))  # another random init
    assert new_seed["feature_cache"].startswith("linear probe") and len(list(cache.glob("*.npy"))) == 6


def test_trials_the_cache_cannot_serve_exactly_run_the_whole_model(tmp_path):
    partial = train_and_evaluate(_point("test_resnet", 2), _context(tmp_path / "fc"))
    assert partial["feature_cache"].startswith("off (not a linear probe")
    assert not list((tmp_path / "fc").glob("*.npy"))
    import timm

    model = timm.create_model("test_resnet", num_classes=2, drop_rate=0.5)  # dropout between pooling and fc
    groups = backbones.layer_groups(model)
    info = backbones.apply_freeze(model, groups, tuple(range(groups.n)))
    plan, why = probe_plan(model, info.n_groups, info.frozen_groups, info.frozen_modules, torch.randn(4, 3, 32, 32),
                           lambda: loop.autocast(torch.device("cpu")))
    assert plan is None and "dropout p=0.5" in why


def test_the_cache_computes_a_key_once_and_evicts_the_least_recently_used(tmp_path):
    calls = []

    def make(value: float, rows: int = 1000):
        def compute():
            calls.append(value)
            return np.full((rows, 64), value, dtype=np.float32)  # 256 KB
        return compute

    cache = FeatureCache(tmp_path, budget_bytes=600_000)  # room for two entries
    a = cache.get_or_compute("a", make(1.0))
    assert cache.get_or_compute("a", make(9.0))[0, 0] == 1.0 and calls == [1.0]  # computed once
    assert not a.flags.writeable  # memory-mapped read-only: trials cannot corrupt each other's features
    cache.get_or_compute("b", make(2.0))
    cache.get_or_compute("a", make(1.0))  # a read: now the most recently used
    cache.get_or_compute("c", make(3.0))  # over budget: b, the least recently used, goes
    left = list(tmp_path.glob("*.npy"))
    assert sorted(p.stem for p in left) == ["a", "c"] and sum(p.stat().st_size for p in left) <= 600_000
    assert not list(tmp_path.glob("*.tmp"))
