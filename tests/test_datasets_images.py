"""Image-folder adapters (celeba, waterbirds, image_csv) on tiny copies of their real layouts."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.helpers import trial_config
from trainables.data import SPLITS, Dataset, DatasetError, ImageReadError, build_dataset
from trainables.data import fixtures as F
from trainables.data.images import IMAGENET_MEAN, IMAGENET_STD, decode_image
from trainables.finetune import PER_GROUP_FILE, PREDICTIONS_FILE, VAL_PREDICTIONS_FILE, TrialContext, train_and_evaluate


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, dict]]:
    tmp = tmp_path_factory.mktemp("layouts")
    return {"celeba": ("celeba", F.write_celeba(tmp / "celeba")),
            "celeba_csv": ("celeba", F.write_celeba(tmp / "celeba_csv", kaggle_csv=True)),
            "waterbirds": ("waterbirds", F.write_waterbirds(tmp / "waterbirds")),
            "image_csv": ("image_csv", F.write_image_csv(tmp / "image_csv")),
            "image_csv_unsplit": ("image_csv", F.write_image_csv(tmp / "image_csv_unsplit", split=False))}


def _copy(layout: tuple[str, dict], tmp: Path) -> tuple[str, dict, Path]:
    name, opts = layout
    root = tmp / "copy"
    shutil.copytree(opts["root"], root)
    return name, {**opts, "root": str(root)}, root


# ----------------------------------------------------------------------------------------- celeba


def test_celeba_splits_follow_the_partition_file(layouts) -> None:
    name, opts = layouts["celeba"]
    ds = build_dataset(name, opts)
    root = Path(opts["root"])
    attrs = pd.read_csv(root / "list_attr_celeba.txt", sep=r"\s+", skiprows=1)
    part = pd.read_csv(root / "list_eval_partition.txt", sep=r"\s+", header=None, index_col=0)[1]
    assert ds.modality == "image" and ds.input_shape == (3, 16, 16) and not ds.in_memory
    assert ds.primary == "Male" and ds.group_names == {"Male": ("not_Male", "Male"), "Young": ("not_Young", "Young")}
    files = {s: [Path(p).name for p in ds.paths(s)] for s in SPLITS}
    assert sorted(files["val"]) == sorted(part.index[part == 1]) and sorted(files["test"]) == sorted(part.index[part == 2])
    train = set(part.index[part == 0])
    assert set(files["source"]) | set(files["finetune"]) == train and not set(files["source"]) & set(files["finetune"])
    assert len(files["source"]) == len(files["finetune"]) == len(train) // 2  # source_fraction 0.5
    for split in SPLITS:  # labels and groups are the attribute file's values, row by row
        meta = ds.meta(split)
        np.testing.assert_array_equal(meta.labels, (attrs.loc[files[split], "Blond_Hair"] == 1).astype(int))
        np.testing.assert_array_equal(meta.groups, (attrs.loc[files[split], "Male"] == 1).astype(int))
        np.testing.assert_array_equal(meta.attributes["Young"], (attrs.loc[files[split], "Young"] == 1).astype(int))


def test_celeba_kaggle_csv_layout_reads_the_same(layouts) -> None:
    a, b = build_dataset(*layouts["celeba"]), build_dataset(*layouts["celeba_csv"])
    for split in SPLITS:
        np.testing.assert_array_equal(a.meta(split).labels, b.meta(split).labels)
        np.testing.assert_array_equal(a.meta(split).groups, b.meta(split).groups)


def test_celeba_any_attribute_as_target_or_sensitive(layouts) -> None:
    name, opts = layouts["celeba"]
    ds = build_dataset(name, {**opts, "target": "Wearing_Hat", "sensitive": ["Young", "Male"],
                              "extra_labels": ["Blond_Hair"], "intersect": ["Young", "Male"]})
    meta = ds.meta("test")
    assert ds.primary == "Young" and list(meta.attributes) == ["Young", "Male", "Young_x_Male"]
    np.testing.assert_array_equal(meta.groups, meta.attributes["Young"])
    np.testing.assert_array_equal(meta.attributes["Young_x_Male"], 2 * meta.attributes["Young"] + meta.attributes["Male"])
    assert ds.group_names["Young_x_Male"] == ("not_Young&not_Male", "not_Young&Male", "Young&not_Male", "Young&Male")
    assert set(meta.extra_labels) == {"Blond_Hair"}


def test_source_fraction_and_seed_make_a_deterministic_split(layouts) -> None:
    name, opts = layouts["celeba"]
    quarter = build_dataset(name, {**opts, "source_fraction": 0.25})
    assert (len(quarter.meta("source")), len(quarter.meta("finetune"))) == (24, 72)
    again = build_dataset(name, {**opts, "source_fraction": 0.25})
    other = build_dataset(name, {**opts, "source_fraction": 0.25, "seed": 1})
    assert list(quarter.paths("source")) == list(again.paths("source"))
    assert list(quarter.paths("source")) != list(other.paths("source"))
    assert quarter.fingerprint() == again.fingerprint() != other.fingerprint()
    # every (label, group) cell of the training partition reaches both pools
    for split in ("source", "finetune"):
        m = quarter.meta(split)
        assert {(y, g) for y, g in zip(m.labels, m.groups)} == {(0, 0), (0, 1), (1, 0), (1, 1)}


def test_fingerprint_ignores_location_and_workers_but_not_labels(layouts, tmp_path) -> None:
    name, opts, root = _copy(layouts["celeba"], tmp_path)
    base = build_dataset(*layouts["celeba"]).fingerprint()
    assert build_dataset(name, {**opts, "num_workers": 0}).fingerprint() == base
    text = (root / "list_attr_celeba.txt").read_text().splitlines()
    text[2] = text[2].replace(" 1", "-1", 1) if " 1" in text[2] else text[2].replace("-1", " 1", 1)
    (root / "list_attr_celeba.txt").write_text("\n".join(text) + "\n")
    assert build_dataset(name, opts).fingerprint() != base


def test_celeba_errors_name_what_is_missing(layouts, tmp_path) -> None:
    name, opts, root = _copy(layouts["celeba"], tmp_path)
    with pytest.raises(DatasetError, match=r"dataset.options.root .*does not exist"):
        build_dataset(name, {**opts, "root": str(tmp_path / "nowhere")})
    with pytest.raises(DatasetError, match="dataset.options.root is required"):
        build_dataset(name, {})
    with pytest.raises(DatasetError, match=r"no column 'Blond' \(dataset.options.target\).*did you mean 'Blond_Hair'"):
        build_dataset(name, {**opts, "target": "Blond"})
    with pytest.raises(DatasetError, match=r"no column 'Gender' \(dataset.options.sensitive\)"):
        build_dataset(name, {**opts, "sensitive": ["Gender"]})
    (root / "img_align_celeba" / "000007.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1 image files that do not exist: .*000007\.jpg"):
        build_dataset(name, opts)
    lines = (root / "list_attr_celeba.txt").read_text().splitlines()
    (root / "list_attr_celeba.txt").write_text("\n".join(lines[:-3]) + "\n")
    with pytest.raises(DatasetError, match="declares 160 images but 157 rows follow"):
        build_dataset(name, opts)
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").unlink()
    with pytest.raises(DatasetError, match="list_eval_partition.txt is missing"):
        build_dataset(name, opts)


def test_unreadable_image_is_named_when_streamed_and_at_construction_with_verify(layouts, tmp_path) -> None:
    name, opts, root = _copy(layouts["celeba"], tmp_path)
    ds = build_dataset(name, opts)
    bad = Path(ds.paths("test")[5])
    bad.write_bytes(b"not a jpeg at all")
    for workers in (0, 1):
        with pytest.raises(ImageReadError, match=bad.name):
            list(ds.loader("test", batch_size=8, num_workers=workers))
    with pytest.raises(ImageReadError, match=bad.name):
        ds.inputs("test", np.array([5]))
    with pytest.raises(ImageReadError, match=bad.name):
        build_dataset(name, {**opts, "verify_images": True})


# ------------------------------------------------------------------------------------- waterbirds


def test_waterbirds_reads_metadata_csv(layouts) -> None:
    name, opts = layouts["waterbirds"]
    ds = build_dataset(name, opts)
    frame = pd.read_csv(Path(opts["root"]) / "metadata.csv").set_index("img_filename")
    assert ds.primary == "place" and ds.group_names["place"] == ("land", "water")
    root = Path(opts["root"])
    for split, code in (("val", 1), ("test", 2)):
        rel = [str(Path(p).relative_to(root)) for p in ds.paths(split)]
        assert sorted(rel) == sorted(frame.index[frame["split"] == code])
        np.testing.assert_array_equal(ds.meta(split).labels, frame.loc[rel, "y"])
        np.testing.assert_array_equal(ds.meta(split).groups, frame.loc[rel, "place"])
    assert len(ds.meta("source")) + len(ds.meta("finetune")) == int((frame["split"] == 0).sum())


def test_waterbirds_errors(layouts, tmp_path) -> None:
    name, opts, root = _copy(layouts["waterbirds"], tmp_path)
    frame = pd.read_csv(root / "metadata.csv")
    frame.drop(columns=["place"]).to_csv(root / "metadata.csv", index=False)
    with pytest.raises(DatasetError, match=r"no column 'place' \(dataset.options.sensitive\)"):
        build_dataset(name, opts)
    frame.assign(split=frame["split"].replace(2, 7)).to_csv(root / "metadata.csv", index=False)
    with pytest.raises(DatasetError, match=r"split column 'split' holds unknown values '7'"):
        build_dataset(name, opts)
    (root / "metadata.csv").unlink()
    with pytest.raises(DatasetError, match="metadata.csv is missing"):
        build_dataset(name, opts)


# -------------------------------------------------------------------------------------- image_csv


def test_image_csv_columns_positive_value_and_k_groups(layouts) -> None:
    name, opts = layouts["image_csv"]
    ds = build_dataset(name, opts)
    frame = pd.read_csv(Path(opts["root"]) / "metadata.csv").set_index("path")
    assert ds.group_names == {"sex": ("F", "M"), "site": ("north", "south", "west")}
    rel = [str(Path(p).relative_to(opts["root"])) for p in ds.paths("test")]
    np.testing.assert_array_equal(ds.meta("test").labels, frame.loc[rel, "diagnosis"] == "malignant")
    np.testing.assert_array_equal(ds.meta("test").attributes["site"],
                                  frame.loc[rel, "site"].map({"north": 0, "south": 1, "west": 2}))
    flipped = build_dataset(name, {**opts, "positive": "benign"})
    np.testing.assert_array_equal(flipped.meta("test").labels, 1 - ds.meta("test").labels)
    with pytest.raises(DatasetError, match=r"positive 'unknown' is not a value of target column 'diagnosis'"):
        build_dataset(name, {**opts, "positive": "unknown"})


def test_image_csv_without_split_column_is_split_by_fractions(layouts) -> None:
    name, opts = layouts["image_csv_unsplit"]
    ds = build_dataset(name, opts)
    sizes = {s: len(ds.meta(s)) for s in SPLITS}
    assert sum(sizes.values()) == 120 and sizes["test"] == 24 and sizes["val"] == 12  # 12 strata of 10 rows
    paths = [set(ds.paths(s)) for s in SPLITS]
    assert sum(len(p) for p in paths) == len(set().union(*paths))  # disjoint
    again = build_dataset(name, opts)
    assert all(list(ds.paths(s)) == list(again.paths(s)) for s in SPLITS)
    with pytest.raises(DatasetError, match=r"no column 'fold' \(dataset.options.split_column\)"):
        build_dataset(name, {**opts, "split_column": "fold"})


def test_image_csv_honest_errors(layouts, tmp_path) -> None:
    name, opts, root = _copy(layouts["image_csv"], tmp_path)
    frame = pd.read_csv(root / "metadata.csv")
    test_rows = frame["split"] == "test"
    # a group value absent from the test split
    frame.loc[test_rows & (frame["site"] == "west"), "split"] = "train"
    frame.to_csv(root / "metadata.csv", index=False)
    with pytest.raises(DatasetError, match=r"group 'west' of attribute 'site' has no examples with label 0 in the test"):
        build_dataset(name, opts)
    # a label absent from the test split
    frame = pd.read_csv(root / "metadata.csv")
    frame.loc[(frame["split"] == "test") & (frame["diagnosis"] == "malignant"), "split"] = "train"
    frame.to_csv(root / "metadata.csv", index=False)
    with pytest.raises(DatasetError, match="label 1 is absent from the test split"):
        build_dataset(name, opts)
    # an empty cell is never dropped silently
    frame = pd.read_csv(root / "metadata.csv")
    frame.loc[3, "sex"] = None
    frame.to_csv(root / "metadata.csv", index=False)
    with pytest.raises(DatasetError, match=r"column 'sex' is empty in 1 rows \(row numbers from 0: 3\)"):
        build_dataset(name, opts)
    with pytest.raises(DatasetError, match=r"must hold exactly two values.*3: 'north', 'south', 'west'"):
        build_dataset(name, {**opts, "target": "site", "sensitive": ["diagnosis"], "positive": None})
    with pytest.raises(DatasetError, match="image_csv table .*missing.csv does not exist"):
        build_dataset(name, {**opts, "csv": "missing.csv"})


def test_intersection_needs_sensitive_attributes(layouts) -> None:
    name, opts = layouts["image_csv"]
    with pytest.raises(DatasetError, match=r"intersect \['sex', 'age'\] must name two or more of the sensitive"):
        build_dataset(name, {**opts, "intersect": ["sex", "age"]})


# ---------------------------------------------------------------------------- decoding and streaming


def test_decode_resizes_crops_and_normalises(tmp_path) -> None:
    from PIL import Image

    pixels = np.zeros((30, 60, 3), dtype=np.uint8)
    pixels[:, 15:45] = 255  # a white centre square on a black, wide image
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    x = decode_image(str(tmp_path / "wide.png"), 10)
    assert x.shape == (3, 10, 10) and x.dtype == np.float32
    white = (1 - IMAGENET_MEAN) / IMAGENET_STD
    assert np.allclose(x[:, :, 2:8], white[:, None, None], atol=1e-5)  # the centre crop is the white square


def test_streamed_batches_equal_in_process_decoding(layouts) -> None:
    ds = build_dataset(*layouts["waterbirds"])
    idx = np.array([3, 0, 7, 11, 2])
    direct = ds.inputs("finetune", idx)
    got = torch.empty_like(direct)
    seen = []
    for xb, pos in ds.loader("finetune", idx, batch_size=2, shuffle=True, seed=5, num_workers=2):
        got[pos] = xb
        seen += pos.tolist()
    assert sorted(seen) == list(range(len(idx))) and torch.equal(got, direct)


# ---------------------------------------------------------------------------------- real trials


def _trial(name: str, opts: dict, tmp: Path, sensitive: list[str]) -> dict:
    ctx = TrialContext(dataset=name, dataset_options={**opts, "num_workers": 1}, cache_root=str(tmp / "cache"))
    trial = trial_config({"backbone": "test_resnet", "paradigm": "scratch", "intervention": "correlation",
                          "magnitude": 0.75, "freeze_depth": 1, "seed": 0},
                         {"size": 16, "epochs": 2, "batch_size": 8, "lr": 0.01, "weight_decay": 0.0, "momentum": 0.9,
                          "threshold": 0.5})
    files: dict[int, list[str]] = {}
    result = train_and_evaluate(trial, ctx, on_epoch=lambda r, d: files.__setitem__(r["epoch"], sorted(os.listdir(d))))
    assert files[1] == ["state.pt"] and files[2] == sorted(["state.pt", PREDICTIONS_FILE, VAL_PREDICTIONS_FILE, PER_GROUP_FILE])
    assert result["done_training"] and result["achieved_magnitude"] == 0.75 and result["n_finetune"] == 16
    for attr in sensitive:
        for metric in ("equalized_odds_difference", "worst_group_accuracy", "accuracy_gap"):
            assert 0.0 <= result[f"{metric}/{attr}"] <= 1.0
    assert result["equalized_odds_difference"] == result[f"equalized_odds_difference/{sensitive[0]}"]
    if len(sensitive) > 1:
        assert result["worst:equalized_odds_difference"] == max(result[f"equalized_odds_difference/{a}"] for a in sensitive)
    return result


@pytest.mark.parametrize("layout,sensitive", [("celeba", ["Male", "Young"]), ("waterbirds", ["place"]),
                                              ("image_csv", ["sex", "site"])])
def test_a_real_trial_runs_on_each_image_adapter(layouts, tmp_path, layout: str, sensitive: list[str]) -> None:
    name, opts = layouts[layout]
    result = _trial(name, opts, tmp_path, sensitive)
    assert 0.0 <= result["accuracy"] <= 1.0 and result["device"] == "cpu"
    # the trial fed the backbone its own preprocessing (test_resnet's data config: mean and std 0.5)
    import json

    record = json.loads(result["preprocessing"])
    assert record["mean"] == [0.5, 0.5, 0.5] and record["std"] == [0.5, 0.5, 0.5]


def test_folder_datasets_pickle_for_ray_workers(layouts) -> None:
    import pickle

    ds: Dataset = build_dataset(*layouts["image_csv"])
    back = pickle.loads(pickle.dumps(ds))
    assert back.fingerprint() == ds.fingerprint()
    assert torch.equal(back.inputs("val", np.array([1])), ds.inputs("val", np.array([1])))


@pytest.mark.parametrize("paradigm", ["supervised", "simclr"])
def test_pretraining_on_a_folder_dataset_streams_the_source_split(layouts, tmp_path, monkeypatch, paradigm) -> None:
    """Real CelebA/Waterbirds source splits do not fit in memory: pretraining streams them through the
    loader's worker processes and never materialises the split."""
    from trainables.data.images import FolderImages
    from trainables.pretrain import run_pretrain_job

    whole = FolderImages.inputs

    def refuse_whole_source(self, split, indices=None):
        assert not (split == "source" and indices is None), "pretraining materialised the whole source split"
        return whole(self, split, indices)

    monkeypatch.setattr(FolderImages, "inputs", refuse_whole_source)
    name, opts = layouts["waterbirds"]
    job = {"key": f"stream-{paradigm}", "backbone": "test_resnet", "paradigm": paradigm, "dataset": name,
           "dataset_options": {**opts, "num_workers": 1},
           "hparams": {"epochs": 2, "batch_size": 8, "lr": 0.01, "weight_decay": 0.0, "momentum": 0.9, "seed": 0,
                       "options": {}}}
    out = run_pretrain_job(job, str(tmp_path / "cache"))
    assert not out.reused and len(out.losses) == 2 and all(np.isfinite(out.losses))


def test_the_same_metadata_over_other_images_is_other_data_but_moved_files_are_not(layouts, tmp_path) -> None:
    """A copy whose images were changed (faces blurred, a re-export) keeps every metadata file: it must not share
    the original's pretrained bases, features or trials. Moved files (copytree keeps sizes and times) still do."""
    name, opts, root = _copy(layouts["celeba"], tmp_path)
    base = build_dataset(*layouts["celeba"]).fingerprint()
    assert build_dataset(name, opts).fingerprint() == base  # moved: the same data
    image = next(p for p in sorted(root.rglob("*.jpg")))
    stat = image.stat()
    other = tmp_path / "other.jpg"
    shutil.copy(image, other)
    with open(image, "ab") as f:
        f.write(b"\0")  # another file under the same name: other pixels, other size
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert build_dataset(name, opts).fingerprint() != base
    shutil.copy(other, image)  # the original bytes back, but written now: counted as changed, never as the same
    assert build_dataset(name, opts).fingerprint() != base
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert build_dataset(name, opts).fingerprint() == base


def test_a_root_reached_through_a_symlink_has_the_folders_fingerprint(layouts, tmp_path) -> None:
    name, opts = layouts["celeba"]
    link = tmp_path / "link"
    link.symlink_to(opts["root"], target_is_directory=True)
    assert build_dataset(name, {**opts, "root": str(link)}).fingerprint() == build_dataset(name, opts).fingerprint()
