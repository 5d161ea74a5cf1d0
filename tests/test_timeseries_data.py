"""Time-series datasets: synthetic wearable signals and user arrays, and real trials on both."""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.helpers import trial_config
from trainables import interventions
from trainables.data import SPLITS, DatasetError, DatasetOptionError, build_dataset
from trainables.data import fixtures as F
from trainables.data.timeseries import ACTIVE_CYCLES, REST_CYCLES
from trainables.finetune import STATE_FILE, TrialContext, train_and_evaluate

SMALL = {"n_source": 48, "n_finetune": 96, "n_val": 24, "n_test": 48, "length": 64, "channels": 3, "seed": 0}


@pytest.fixture(scope="module")
def small():
    return build_dataset("synthetic_timeseries", SMALL)


# ------------------------------------------------------------------------------ synthetic_timeseries


def test_interface_and_attributes(small) -> None:
    assert small.modality == "timeseries" and small.input_shape == (3, 64) and small.in_memory
    assert small.primary == "sex" and small.group_names == {"sex": ("female", "male"), "age": ("young", "middle", "old")}
    for split, n in zip(SPLITS, (48, 96, 24, 48)):
        meta = small.meta(split)
        assert len(meta) == n and list(meta.attributes) == ["sex", "age"] and set(meta.extra_labels) == {"device"}
        np.testing.assert_array_equal(meta.groups, meta.attributes["sex"])
    x = small.inputs("finetune", np.array([4, 0]))
    assert x.shape == (2, 3, 64) and x.dtype == torch.float32


@pytest.mark.parametrize("split", ["finetune", "val", "test"])
def test_every_cell_present_and_balanced(small, split: str) -> None:
    meta = small.meta(split)
    for y in (0, 1):
        for sex in (0, 1):
            cell = (meta.labels == y) & (meta.groups == sex)
            assert cell.sum() == len(meta) // 4
            assert np.bincount(meta.attributes["age"][cell], minlength=3).min() >= cell.sum() // 3


@pytest.mark.parametrize("corr", [0.0, 0.75, 1.0])
def test_source_correlation_is_realised(corr: float) -> None:
    meta = build_dataset("synthetic_timeseries", {**SMALL, "source_correlation": corr}).meta("source")
    assert abs(np.mean(meta.labels == meta.attributes["sex"]) - corr) <= 1 / len(meta)


def test_correlation_intervention_reaches_high_magnitudes(small) -> None:
    pool = small.meta("finetune")
    interventions.check_feasible("correlation", pool.labels, pool.groups, [0.0, 1.0], 48)  # so all in between


def test_deterministic_and_index_stable(small) -> None:
    again = build_dataset("synthetic_timeseries", dict(SMALL))
    full = small.inputs("test")
    assert torch.equal(full, again.inputs("test"))
    assert torch.equal(small.inputs("test", np.array([7, 2])), full[[7, 2]])
    other = build_dataset("synthetic_timeseries", {**SMALL, "seed": 1})
    assert not torch.equal(full, other.inputs("test")) and other.fingerprint() != small.fingerprint()
    back = pickle.loads(pickle.dumps(small))
    assert back._signals == {} and torch.equal(back.inputs("test"), full)  # shipped without signals, same on arrival


def test_options_shape_the_signals() -> None:
    quiet = {**SMALL, "noise": 0.0, "device_strength": 0.0, "age_strength": 0.0, "age_attenuation": 0.5,
             "sex_strength": 2.0, "target_strength": 1.0}
    ds = build_dataset("synthetic_timeseries", quiet)
    meta, x = ds.meta("test"), ds.inputs("test").numpy()
    # sex raises the last channel's baseline by sex_strength; other channels average zero
    assert np.allclose(x[:, -1].mean(axis=1), 2.0 * meta.groups, atol=1e-4)
    assert np.allclose(x[:, 0].mean(axis=1), 0.0, atol=1e-4)
    # the activity amplitude shrinks with age: old = (1 - age_attenuation) x young
    amp = np.abs(x[:, 0]).max(axis=1)
    young, old = meta.attributes["age"] == 0, meta.attributes["age"] == 2
    assert np.isclose(amp[old].mean() / amp[young].mean(), 0.5, atol=0.02)
    # the label is the activity's frequency
    peak = np.abs(np.fft.rfft(x[:, 0], axis=1)).argmax(axis=1)
    np.testing.assert_array_equal(peak, np.where(meta.labels == 1, ACTIVE_CYCLES, REST_CYCLES))
    # the device adds a square wave
    dev = build_dataset("synthetic_timeseries", {**quiet, "target_strength": 0.0, "sex_strength": 0.0,
                                                 "device_strength": 0.5})
    xd, md = dev.inputs("test").numpy(), dev.meta("test")
    assert np.allclose(np.abs(xd).max(axis=(1, 2)), 0.5 * md.extra_labels["device"])


def test_primary_attribute_order_and_intersection() -> None:
    ds = build_dataset("synthetic_timeseries", {**SMALL, "sensitive": ["age", "sex"], "intersect": ["sex", "age"]})
    meta = ds.meta("test")
    assert ds.primary == "age" and list(meta.attributes) == ["age", "sex", "sex_x_age"]
    np.testing.assert_array_equal(meta.groups, meta.attributes["age"])
    np.testing.assert_array_equal(meta.attributes["sex_x_age"], 3 * meta.attributes["sex"] + meta.attributes["age"])
    assert ds.group_names["sex_x_age"][5] == "male&old"
    for y in (0, 1):  # balanced over (label, age band) when age is primary
        assert np.bincount(meta.groups[meta.labels == y], minlength=3).tolist() == [8, 8, 8]
    pool = ds.meta("finetune")
    with pytest.raises(interventions.InterventionError, match="needs a binary group"):
        interventions.apply_intervention("correlation", pool.labels, pool.groups, 0.7, 20, 0)
    assert len(interventions.apply_intervention("none", pool.labels, pool.groups, 0.0, 20, 0).indices) == 20


def test_skin_is_a_third_attribute_balanced_within_every_cell() -> None:
    ds = build_dataset("synthetic_timeseries", {**SMALL, "sensitive": ["sex", "age", "skin"], "n_test": 96, "n_val": 48,
                                                "intersect": ["sex", "skin"]})
    meta = ds.meta("test")
    assert list(meta.attributes) == ["sex", "age", "skin", "sex_x_skin"] and ds.group_names["skin"] == ("light", "dark")
    for y in (0, 1):
        for sex in (0, 1):
            cell = (meta.labels == y) & (meta.groups == sex)
            assert np.bincount(meta.attributes["skin"][cell], minlength=2).tolist() == [12, 12]
            for age in range(3):  # and within each age band of the cell
                assert np.bincount(meta.attributes["skin"][cell & (meta.attributes["age"] == age)]).tolist() == [4, 4]
    # as the primary attribute it is binary, so the correlation intervention drives it
    as_primary = build_dataset("synthetic_timeseries", {**SMALL, "sensitive": ["skin", "sex"]})
    pool = as_primary.meta("finetune")
    np.testing.assert_array_equal(pool.groups, pool.attributes["skin"])
    chosen = interventions.apply_intervention("correlation", pool.labels, pool.groups, 0.75, 48, 0).indices
    assert np.mean(pool.labels[chosen] == pool.groups[chosen]) == 0.75


def test_skin_noise_degrades_only_dark_skin_signals() -> None:
    quiet = {**SMALL, "noise": 0.0, "device_strength": 0.0, "age_strength": 0.0, "sex_strength": 0.0,
             "sensitive": ["sex", "age", "skin"], "n_test": 96, "n_val": 48}
    clean = build_dataset("synthetic_timeseries", quiet)
    noisy = build_dataset("synthetic_timeseries", {**quiet, "skin_noise": 0.8})
    dark = noisy.meta("test").attributes["skin"] == 1
    diff = (noisy.inputs("test") - clean.inputs("test")).numpy()
    assert np.all(diff[~dark] == 0) and abs(diff[dark].std() - 0.8) < 0.02
    assert noisy.fingerprint() != clean.fingerprint()


@pytest.mark.parametrize("options,fragment", [
    ({"sensitive": ["race"]}, "unknown attributes ['race']"),
    ({"sensitive": ["sex", "skin"], "n_test": 12}, "n_test: got 12; too few examples for both labels in the skin groups"),
    ({"intersect": ["sex"]}, "two or more of the sensitive"),
    ({"sensitive": ["sex"], "intersect": ["sex", "age"]}, "two or more of the sensitive"),
    ({"n_test": 8}, "every (label, sex, age band) cell"),
])
def test_bad_options(options: dict, fragment: str) -> None:
    with pytest.raises(DatasetOptionError) as err:
        build_dataset("synthetic_timeseries", options)
    assert fragment in str(err.value)


# ---------------------------------------------------------------------------------- timeseries_arrays


@pytest.fixture(scope="module")
def arrays_root(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return F.write_timeseries_arrays(tmp_path_factory.mktemp("ts") / "data")


def test_arrays_with_parquet_table(arrays_root: dict) -> None:
    ds = build_dataset("timeseries_arrays", arrays_root)
    root = Path(arrays_root["root"])
    x = np.load(root / "arrays.npz")["X"]
    table = pd.read_parquet(root / "metadata.parquet")
    assert ds.input_shape == (2, 32) and ds.primary == "sex" and ds.group_names["age_band"] == ("18-39", "40-64", "65+")
    rows = ds._table.rows["test"]
    assert sorted(rows.tolist()) == np.flatnonzero(table["split"] == "test").tolist()
    np.testing.assert_array_equal(ds.inputs("test").numpy(), x[rows])
    np.testing.assert_array_equal(ds.meta("test").labels, table["label"].to_numpy()[rows])
    np.testing.assert_array_equal(ds.meta("test").groups, (table["sex"].to_numpy()[rows] == "male").astype(int))
    assert len(ds.meta("source")) + len(ds.meta("finetune")) == int((table["split"] == "train").sum())


def test_arrays_channels_last_csv_unsplit_and_npy(tmp_path) -> None:
    opts = F.write_timeseries_arrays(tmp_path / "a", table="meta.csv", channels_last=True, split=False)
    ds = build_dataset("timeseries_arrays", opts)
    raw = np.load(tmp_path / "a" / "arrays.npz")["X"]  # (N, T, C)
    assert raw.shape[1:] == (32, 2) and ds.input_shape == (2, 32)
    rows = ds._table.rows["val"]
    np.testing.assert_array_equal(ds.inputs("val").numpy(), raw[rows].transpose(0, 2, 1))
    np.save(tmp_path / "a" / "X.npy", raw)
    as_npy = build_dataset("timeseries_arrays", {**opts, "arrays": "X.npy"})
    assert torch.equal(as_npy.inputs("val"), ds.inputs("val"))
    assert pickle.loads(pickle.dumps(ds))._x is None  # the array is not shipped to workers


@pytest.mark.parametrize("channels_last", [False, True])
def test_arrays_from_parquet_equal_the_npz(tmp_path, channels_last: bool) -> None:
    npz = F.write_timeseries_arrays(tmp_path / "npz", channels_last=channels_last)
    pq = F.write_timeseries_arrays(tmp_path / "pq", channels_last=channels_last, arrays="arrays.parquet")
    a, b = build_dataset("timeseries_arrays", npz), build_dataset("timeseries_arrays", pq)
    assert a.input_shape == b.input_shape == (2, 32)
    for split in ("source", "finetune", "val", "test"):
        assert torch.equal(a.inputs(split), b.inputs(split))


def test_parquet_array_errors_name_the_rows_and_columns(tmp_path) -> None:
    opts = F.write_timeseries_arrays(tmp_path / "pq", arrays="arrays.parquet")
    root = Path(opts["root"])
    frame = pd.read_parquet(root / "arrays.parquet")
    with pytest.raises(DatasetError, match=r"has no column 'Y' \(dataset.options.array_key\); it has \['X'\]"):
        build_dataset("timeseries_arrays", {**opts, "array_key": "Y"})
    ragged = frame.copy()
    ragged.at[7, "X"] = [list(ragged.at[7, "X"][0])[:-1], list(ragged.at[7, "X"][1])]  # one value short
    ragged.to_parquet(root / "ragged.parquet")
    ds = build_dataset("timeseries_arrays", {**opts, "arrays": "ragged.parquet"})
    with pytest.raises(DatasetError, match=r"rows \[7\] \(1 in all, counted from 0\) are not 2 x 32"):
        ds.inputs("test")
    pd.DataFrame({"X": np.arange(len(frame), dtype=float)}).to_parquet(root / "scalars.parquet")
    with pytest.raises(DatasetError, match="must hold one nested list of numbers per example"):
        build_dataset("timeseries_arrays", {**opts, "arrays": "scalars.parquet"})


def test_arrays_errors(arrays_root: dict, tmp_path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(arrays_root["root"], root)
    opts = {**arrays_root, "root": str(root)}
    with pytest.raises(DatasetError, match=r"holds no array 'Y' \(dataset.options.array_key\); it has \['X'\]"):
        build_dataset("timeseries_arrays", {**opts, "array_key": "Y"})
    with pytest.raises(DatasetError, match="array file .*nothing.npz does not exist"):
        build_dataset("timeseries_arrays", {**opts, "arrays": "nothing.npz"})
    with pytest.raises(DatasetError, match=r"metadata table .*meta.parquet does not exist"):
        build_dataset("timeseries_arrays", {**opts, "metadata": "meta.parquet"})
    with pytest.raises(DatasetError, match=r"dataset.options.root .*does not exist"):
        build_dataset("timeseries_arrays", {**opts, "root": str(tmp_path / "nowhere")})
    x = np.load(root / "arrays.npz")["X"]
    np.savez(root / "flat.npz", X=x[:, 0])
    with pytest.raises(DatasetError, match=r"has shape \(240, 32\).*expected a real-valued \(N, C, T\)"):
        build_dataset("timeseries_arrays", {**opts, "arrays": "flat.npz"})
    np.savez(root / "short.npz", X=x[:-1])
    with pytest.raises(DatasetError, match="has 240 rows but short.npz holds 239 examples"):
        build_dataset("timeseries_arrays", {**opts, "arrays": "short.npz"})
    bad = x.copy()
    bad[[3, 9], 1, 5] = np.nan
    np.savez(root / "nan.npz", X=bad)
    ds = build_dataset("timeseries_arrays", {**opts, "arrays": "nan.npz"})  # the header is fine
    with pytest.raises(DatasetError, match=r"examples \[3, 9\] \(2 in all, counted from 0\) hold NaN"):
        ds.inputs("test")


# ----------------------------------------------------------------------------------------- trials

FT = {"size": 48, "epochs": 2, "batch_size": 16, "lr": 0.05, "weight_decay": 0.0, "momentum": 0.9, "threshold": 0.5}


def _point(size: int = FT["size"], **kw):
    return trial_config({"backbone": "cnn1d_tiny", "paradigm": "scratch", "intervention": "correlation",
                         "magnitude": 0.75, "freeze_depth": [0, 2], "seed": 0, **kw}, {**FT, "size": size})


def test_trial_on_synthetic_timeseries_reports_every_attribute(tmp_path) -> None:
    ctx = TrialContext("synthetic_timeseries", {**SMALL, "intersect": ["sex", "age"]}, str(tmp_path))
    r = train_and_evaluate(_point(), ctx)
    assert r["frozen_groups"] == "[0, 2]" and r["n_groups"] == 3 and r["achieved_magnitude"] == 0.75
    for attr in ("sex", "age", "sex_x_age"):
        assert 0 <= r[f"equalized_odds_difference/{attr}"] <= 1 and 0 <= r[f"worst_group_auroc/{attr}"] <= 1
    assert r["worst:equalized_odds_difference"] == max(r[f"equalized_odds_difference/{a}"] for a in ("sex", "age", "sex_x_age"))


def test_trial_on_timeseries_arrays(arrays_root: dict, tmp_path) -> None:
    ctx = TrialContext("timeseries_arrays", arrays_root, str(tmp_path))
    r = train_and_evaluate(_point(40, backbone="transformer1d_tiny", freeze_depth=1), ctx)
    assert r["done_training"] and 0 <= r["equalized_odds_difference/age_band"] <= 1


def test_resumed_trial_ends_where_an_uninterrupted_one_does(tmp_path) -> None:
    ctx = TrialContext("synthetic_timeseries", SMALL, str(tmp_path))
    states: dict[int, dict] = {}
    on_epoch = lambda r, d: states.__setitem__(r["epoch"], torch.load(d / STATE_FILE, weights_only=True))  # noqa: E731
    whole = train_and_evaluate(_point(freeze_depth="full"), ctx, on_epoch=on_epoch)
    epochs: list[int] = []
    resumed = train_and_evaluate(_point(freeze_depth="full"), ctx, state=states[1],
                                 on_epoch=lambda r, d: epochs.append(r["epoch"]))
    assert epochs == [2]
    assert resumed["train_loss"] == whole["train_loss"] and resumed["auroc"] == whole["auroc"]


def test_non_finite_array_values_fail_the_plan_naming_the_examples(tmp_path) -> None:
    from orchestrator.plan import build_plan
    from orchestrator.spec import SpecError, parse_spec
    from tests.helpers import tiny_spec

    opts = F.write_timeseries_arrays(tmp_path / "a")
    x = np.load(tmp_path / "a" / "arrays.npz")["X"]
    x[5, 1, 3] = np.nan
    x[9, 0, 0] = np.inf
    np.savez(tmp_path / "a" / "arrays.npz", X=x)
    spec = tiny_spec(**{"dataset": {"name": "timeseries_arrays", "options": opts}, "axes.backbone": ["cnn1d_tiny"],
                        "axes.paradigm": ["scratch"], "axes.intervention": {"kind": "none", "magnitudes": [0.5]},
                        "finetune.size": 8})
    with pytest.raises(SpecError) as err:
        build_plan(parse_spec(spec))
    assert err.value.path == "dataset.options"
    assert "examples [5, 9] (2 in all, counted from 0) hold NaN or infinite values" in str(err.value)
