"""The data layer: one interface, deterministic synthetic images whose cues are real and ranked."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from trainables.data import DATASETS, SPLITS, Dataset, DatasetOptionError, SplitMeta, build_dataset
from trainables.registry import UnknownNameError

SMALL = {"n_source": 400, "n_finetune": 600, "n_val": 200, "n_test": 400, "image_size": 16, "seed": 0}


@pytest.fixture(scope="module")
def small() -> Dataset:
    return build_dataset("synthetic_images", SMALL)


def test_registered_and_interface(small: Dataset) -> None:
    assert "synthetic_images" in DATASETS.names()
    assert small.modality == "image" and small.input_shape == (3, 16, 16)
    assert small.primary == "group" and small.group_names["group"] == ("red", "green")
    for split, n in zip(SPLITS, (400, 600, 200, 400)):
        meta = small.meta(split)
        assert isinstance(meta, SplitMeta) and len(meta) == n
        for arr in (meta.labels, meta.groups, meta.attributes["group"], meta.extra_labels["stripes"]):
            assert arr.dtype == np.int64 and arr.shape == (n,)
        np.testing.assert_array_equal(meta.attributes[small.primary], meta.groups)
        assert set(np.unique(meta.labels)) <= {0, 1} and set(np.unique(meta.groups)) <= {0, 1}


def test_default_options_shapes() -> None:
    ds = build_dataset("synthetic_images", None)
    assert ds.input_shape == (3, 32, 32)
    assert [len(ds.meta(s)) for s in SPLITS] == [4000, 6000, 1000, 2000]
    x = ds.inputs("finetune", np.array([5, 3000]))
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32


def test_meta_is_read_only(small: Dataset) -> None:
    with pytest.raises(ValueError):
        small.meta("finetune").labels[0] = 1


def test_inputs_shape_dtype_and_only_requested_rows(small: Dataset) -> None:
    x = small.inputs("test", np.array([0, 7, 3]))
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.float32
    assert small.inputs("val").shape == (200, 3, 16, 16)
    assert small.inputs("source", np.array([], dtype=np.int64)).shape == (0, 3, 16, 16)
    with pytest.raises(IndexError, match="out of range"):
        small.inputs("test", np.array([400]))


def test_unknown_split_lists_valid_ones(small: Dataset) -> None:
    for call in (lambda: small.meta("train"), lambda: small.inputs("train", np.array([0]))):
        with pytest.raises(ValueError, match="source, finetune, val, test"):
            call()


def test_same_options_give_identical_tensors(small: Dataset) -> None:
    again = build_dataset("synthetic_images", dict(SMALL))
    idx = np.array([0, 11, 599, 42])
    assert torch.equal(small.inputs("finetune", idx), again.inputs("finetune", idx))
    for split in SPLITS:
        np.testing.assert_array_equal(small.meta(split).labels, again.meta(split).labels)
        np.testing.assert_array_equal(small.meta(split).groups, again.meta(split).groups)
    assert small.fingerprint() == again.fingerprint()


def test_identical_in_a_fresh_process(small: Dataset) -> None:
    code = ("import numpy as np; from trainables.data import build_dataset; "
            f"x = build_dataset('synthetic_images', {SMALL!r}).inputs('test', np.array([3, 250])); "
            "import sys; sys.stdout.write(x.numpy().tobytes().hex())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out == small.inputs("test", np.array([3, 250])).numpy().tobytes().hex()


def test_index_alone_equals_index_in_batch(small: Dataset) -> None:
    batch = small.inputs("finetune", np.arange(20))
    for i in (0, 7, 19):
        assert torch.equal(small.inputs("finetune", np.array([i]))[0], batch[i])
    assert torch.equal(small.inputs("finetune", np.array([19, 7]))[1], batch[7])


def test_different_seeds_and_splits_differ(small: Dataset) -> None:
    other = build_dataset("synthetic_images", {**SMALL, "seed": 1})
    assert not torch.equal(small.inputs("test", np.arange(5)), other.inputs("test", np.arange(5)))
    assert not np.array_equal(small.meta("test").labels, other.meta("test").labels)
    assert small.fingerprint() != other.fingerprint()
    assert not torch.equal(small.inputs("val", np.arange(5)), small.inputs("test", np.arange(5)))


def test_fingerprint_is_canonical() -> None:
    a = build_dataset("synthetic_images", {"noise": 1, "seed": 3})
    b = build_dataset("synthetic_images", {"seed": 3, "noise": 1.0, "image_size": 32})
    assert a.fingerprint() == b.fingerprint() and a.fingerprint().startswith("synthetic_images/")


@pytest.mark.parametrize("split", ["finetune", "val", "test"])
def test_balanced_splits_hold_every_cell_equally(small: Dataset, split: str) -> None:
    meta = small.meta(split)
    n = len(meta)
    for y in (0, 1):
        for g in (0, 1):
            cell = (meta.labels == y) & (meta.groups == g)
            assert cell.sum() == n // 4
            # the control attribute is unrelated: balanced inside every cell
            assert abs(meta.extra_labels["stripes"][cell].mean() - 0.5) <= 1 / cell.sum()


def test_cells_present_even_when_size_not_divisible_by_four() -> None:
    meta = build_dataset("synthetic_images", {**SMALL, "n_val": 7}).meta("val")
    counts = [int(((meta.labels == y) & (meta.groups == g)).sum()) for y in (0, 1) for g in (0, 1)]
    assert sum(counts) == 7 and min(counts) >= 1 and max(counts) - min(counts) <= 1


@pytest.mark.parametrize("corr", [0.0, 0.5, 0.8, 1.0])
def test_source_correlation_is_realised(corr: float) -> None:
    meta = build_dataset("synthetic_images", {**SMALL, "source_correlation": corr}).meta("source")
    assert abs(np.mean(meta.labels == meta.groups) - corr) <= 1 / len(meta)
    assert abs(meta.labels.mean() - 0.5) <= 1 / len(meta)


def test_unknown_option_names_key_and_lists_valid_ones() -> None:
    with pytest.raises(DatasetOptionError) as err:
        build_dataset("synthetic_images", {"n_sorce": 10})
    msg = str(err.value)
    assert "dataset.options.n_sorce" in msg and "10" in msg
    assert "n_source" in msg and "group_strength" in msg and "image_size" in msg
    assert err.value.key == "n_sorce"


@pytest.mark.parametrize("key,value", [
    ("n_source", 0), ("n_test", -5), ("n_val", 2.5), ("n_finetune", "100"), ("n_source", True),
    ("source_correlation", 1.5), ("source_correlation", -0.1), ("image_size", 8),
    ("noise", -1.0), ("group_strength", float("nan")), ("target_strength", -0.1), ("seed", -1),
])
def test_bad_option_values_are_named(key: str, value: object) -> None:
    with pytest.raises(DatasetOptionError) as err:
        build_dataset("synthetic_images", {key: value})
    assert f"dataset.options.{key}" in str(err.value) and repr(value) in str(err.value)
    assert isinstance(err.value, ValueError)


def test_options_must_be_a_mapping() -> None:
    with pytest.raises(DatasetOptionError, match="dataset.options"):
        build_dataset("synthetic_images", [("seed", 1)])  # type: ignore[arg-type]


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(UnknownNameError) as err:
        build_dataset("synthetic_image", {})
    assert "synthetic_images" in str(err.value) and "Did you mean" in str(err.value)


def test_cue_strengths_shape_the_pixels() -> None:
    """With no noise the image is exactly its cues: border channel = group, square half = label."""
    ds = build_dataset("synthetic_images", {**SMALL, "noise": 0.0, "stripe_strength": 0.0})
    meta = ds.meta("test")
    x = ds.inputs("test", np.arange(40)).numpy()
    g, y = meta.groups[:40], meta.labels[:40]
    assert np.allclose(x[np.arange(40), g, :3].mean(axis=(1, 2)), 1.5)
    assert np.allclose(x[np.arange(40), 1 - g, :3], 0.0)
    top = x[:, :, 3:8].sum(axis=(1, 2, 3)) > x[:, :, 8:].sum(axis=(1, 2, 3))
    np.testing.assert_array_equal(top, y == 1)
    assert np.allclose(x[:, :, 3:].sum(axis=(1, 2, 3)), 0.8 * 3 * 16)  # one 4x4 square on 3 channels


def _logistic_accuracy(x: torch.Tensor, y: np.ndarray, x_eval: torch.Tensor, y_eval: np.ndarray,
                       steps: int = 30) -> float:
    torch.manual_seed(0)
    xf, xe = x.reshape(len(x), -1), x_eval.reshape(len(x_eval), -1)
    w = torch.zeros(xf.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([w, b], lr=0.01)  # plain gradient descent: the implicit bias networks share
    target = torch.tensor(np.array(y), dtype=torch.float32)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(xf @ w + b, target).backward()
        opt.step()
    with torch.no_grad():
        pred = ((xe @ w + b) > 0).numpy()
    return float(np.mean(pred == y_eval))


def test_cues_are_learnable_from_raw_pixels() -> None:
    """A linear model finds the group near-perfectly and the target well above chance."""
    ds = build_dataset("synthetic_images", {"n_finetune": 800, "n_test": 800})
    ft, te = ds.meta("finetune"), ds.meta("test")
    x, xt = ds.inputs("finetune"), ds.inputs("test")
    assert _logistic_accuracy(x, ft.groups, xt, te.groups) > 0.95
    assert _logistic_accuracy(x, ft.labels, xt, te.labels) > 0.7
    assert _logistic_accuracy(x, ft.extra_labels["stripes"], xt, te.extra_labels["stripes"]) > 0.7


def test_group_cue_is_the_shortcut() -> None:
    """Trained on labels where group == label always, a linear model follows the group, not the
    target: it fails the conflicting test cells. That is the salience paper A's effects need."""
    ds = build_dataset("synthetic_images", {"n_source": 800, "n_test": 800, "source_correlation": 1.0})
    src, te = ds.meta("source"), ds.meta("test")
    conflicting = te.labels != te.groups
    xt = ds.inputs("test")
    acc_conflicting = _logistic_accuracy(ds.inputs("source"), src.labels, xt[conflicting], te.labels[conflicting])
    acc_aligned = _logistic_accuracy(ds.inputs("source"), src.labels, xt[~conflicting], te.labels[~conflicting])
    assert acc_aligned > 0.95 and acc_conflicting < 0.2


def test_dataset_pickles_for_ray_workers(small: Dataset) -> None:
    import pickle

    copy = pickle.loads(pickle.dumps(small))
    assert copy.fingerprint() == small.fingerprint()
    np.testing.assert_array_equal(copy.meta("val").groups, small.meta("val").groups)
    assert torch.equal(copy.inputs("val", np.arange(3)), small.inputs("val", np.arange(3)))


@pytest.mark.parametrize("options, key", [({"n_val": 20, "n_test": 20, "eval_correlation": 0.95}, "eval_correlation"),
                                          ({"n_val": 20, "n_test": 20, "eval_correlation": 0.05}, "eval_correlation")])
def test_a_skew_that_empties_an_evaluation_cell_is_refused_at_build_time(options, key):
    """The metrics need both labels in both groups of val and test: a cell rounded to zero is an option error
    naming the fix, not a ValueError from every trial after its training."""
    with pytest.raises(DatasetOptionError, match=rf"dataset\.options\.{key}: .*cells \[.*\] empty at n_val = 20; "
                                                 r"raise n_val or move eval_correlation towards 0\.5"):
        build_dataset("synthetic_images", options)
    build_dataset("synthetic_images", {"n_val": 40, "n_test": 40, "eval_correlation": 0.95})  # 38 / 2: every cell kept


def test_an_array_cache_entry_evicted_as_it_is_written_is_still_returned(tmp_path, monkeypatch):
    """Another key's writer may evict a new file between its rename and its opening: the array is mapped before
    the rename, so the caller still gets it."""
    from trainables.array_cache import ArrayCache

    cache = ArrayCache(tmp_path, budget_bytes=1 << 20)

    def evicted_at_once(self, keep):
        keep.unlink()  # what a concurrent writer's eviction does to this entry

    monkeypatch.setattr(ArrayCache, "_evict", evicted_at_once)
    got = cache.get_or_compute("k", lambda: np.arange(6.0))
    assert np.array_equal(got, np.arange(6.0)) and not cache.path("k").exists()
    filled = cache.get_or_fill("f", (3,), np.int64, lambda out: out.__setitem__(slice(None), [1, 2, 3]))
    assert filled.tolist() == [1, 2, 3]


def test_an_array_cache_entry_evicted_right_after_its_rename_is_still_returned(tmp_path, monkeypatch):
    """The other window: the file disappears between the rename and this writer's own eviction pass."""
    import os

    from trainables.array_cache import ArrayCache

    cache = ArrayCache(tmp_path, budget_bytes=1 << 20)
    rename = os.replace

    def rename_then_lose(src, dst):
        rename(src, dst)
        os.unlink(dst)  # another key's writer evicted it at once

    monkeypatch.setattr(os, "replace", rename_then_lose)
    assert cache.get_or_compute("k", lambda: np.arange(4.0)).tolist() == [0.0, 1.0, 2.0, 3.0]
