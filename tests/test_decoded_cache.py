"""The decoded-image cache of folder datasets (CelebA, Waterbirds, image CSV): each split's files are decoded
once into uint8 pixels under a shared folder and fed from there; the tensors are exactly the streamed ones,
a changed file makes a new entry, and a split larger than the budget streams from its files."""
from __future__ import annotations

import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from orchestrator.spec import Resources
from trainables.data import SPLITS, build_dataset
from trainables.data import fixtures as F
from trainables.data import images
from trainables.data.preprocessing import Preprocessing, _transform

WRITERS = {"celeba": F.write_celeba, "waterbirds": F.write_waterbirds, "image_csv": F.write_image_csv}
MODEL = Preprocessing((3, 16, 16), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic", crop_pct=0.875)


def _batches(ds, split: str, rows: np.ndarray) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(ds.loader(split, rows, batch_size=5, shuffle=True, seed=3, epoch=1, drop_last=True))


@pytest.mark.parametrize("name", list(WRITERS))
def test_cached_pixels_are_the_decoded_ones(tmp_path, name):
    opts = {**WRITERS[name](tmp_path / name), "num_workers": 0}
    direct = build_dataset(name, opts)
    cached = direct.with_input_cache(tmp_path / "decoded")
    assert cached.fingerprint() == direct.fingerprint() and not cached.in_memory
    for split in SPLITS:
        assert torch.equal(cached.inputs(split), direct.inputs(split)), split
    # a model's own preprocessing (bicubic, crop 0.875, 0.5/0.5 statistics) gets its own entries
    for want, got in ((direct, cached), (direct.for_model(MODEL), cached.for_model(MODEL))):
        rows = np.arange(len(want.meta("finetune")))[::-1]  # any rows, in any order
        expected, streamed = _batches(want, "finetune", rows), _batches(got, "finetune", rows)
        assert len(streamed) == len(expected) > 1
        for (a, pos_a), (b, pos_b) in zip(expected, streamed):
            assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b) and torch.equal(pos_a, pos_b)
    assert len(list((tmp_path / "decoded").glob("*.npy"))) == len(SPLITS) + 1  # four splits, one model view


def test_decoding_workers_fill_the_cache(tmp_path):
    opts = {**F.write_image_csv(tmp_path / "csv"), "num_workers": 2}
    direct = build_dataset("image_csv", opts)
    assert torch.equal(direct.with_input_cache(tmp_path / "decoded").inputs("source"), direct.inputs("source"))


def test_files_are_decoded_once_and_again_when_one_changes(tmp_path, monkeypatch):
    opts = {**F.write_image_csv(tmp_path / "csv"), "num_workers": 0}
    decoded = []
    real = images.decode_pixels
    monkeypatch.setattr(images, "decode_pixels", lambda path, pre: decoded.append(path) or real(path, pre))
    first = build_dataset("image_csv", opts).with_input_cache(tmp_path / "decoded")
    n = len(first.meta("test"))
    before = first.inputs("test")
    batches = list(first.loader("test", batch_size=5))
    assert len(decoded) == n and torch.equal(torch.cat([x for x, _ in batches]), before)  # decoded once, read twice
    again = build_dataset("image_csv", opts).with_input_cache(tmp_path / "decoded")  # as another worker builds it
    assert torch.equal(again.inputs("test"), before) and len(decoded) == n
    shipped = pickle.loads(pickle.dumps(first))  # as Ray ships it: the entry is opened again, not copied along
    assert torch.equal(shipped.inputs("test"), before) and len(decoded) == n
    path = again.paths("test")[3]
    Image.fromarray(F.picture(1, 0, np.random.default_rng(7), size=(30, 26))).save(path)  # the file changes
    changed = build_dataset("image_csv", opts).with_input_cache(tmp_path / "decoded")
    after = changed.inputs("test")
    assert len(decoded) == 2 * n  # a new entry for the split holding the file
    assert torch.equal(after[3], torch.from_numpy(images.decode_image(path, changed.preprocessing)))
    assert not torch.equal(after[3], before[3]) and torch.equal(after[:3], before[:3])
    changed.inputs("val")
    assert len(decoded) == 2 * n + 1 + len(changed.meta("val"))  # (and the one decode_image above)


def test_a_split_larger_than_the_budget_streams_from_its_files(tmp_path, monkeypatch):
    opts = {**F.write_image_csv(tmp_path / "csv"), "num_workers": 0}
    decoded = []
    real = images.decode_pixels
    monkeypatch.setattr(images, "decode_pixels", lambda path, pre: decoded.append(path) or real(path, pre))
    ds = build_dataset("image_csv", opts)
    n = len(ds.meta("test"))
    small = ds.with_input_cache(tmp_path / "decoded", budget_bytes=n * 3 * 16 * 16 - 1)
    assert torch.equal(small.inputs("test"), ds.inputs("test")) and len(decoded) == 2 * n
    small.inputs("test")
    assert len(decoded) == 3 * n and not list((tmp_path / "decoded").glob("*.npy"))


@pytest.mark.parametrize("pre", [Preprocessing.imagenet(16), MODEL, Preprocessing((3, 16, 16), crop_mode="border",
                                                                                  crop_pct=0.9),
                                 Preprocessing((3, 20, 16), crop_mode="squash")])
def test_pixels_then_normalize_is_timms_whole_transform(pre):
    """The cache stores ``pixels`` and feeds ``normalize``: together, bit for bit what timm's transform gives."""
    rng = np.random.default_rng(0)
    for w, h in ((24, 20), (40, 31), (16, 16)):
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3)).astype(np.uint8))
        pixels = pre.pixels(image)
        assert pixels.dtype == np.uint8 and pixels.shape == pre.input_size
        assert np.array_equal(pre.normalize(pixels).numpy(), _transform(pre)(image).numpy())



def test_a_trial_on_decoded_images_is_the_same_trial(tmp_path, monkeypatch):
    """A finetuning trial with the decoded-image cache (what launch gives it, resources.input_cache) computes what
    it computes streaming from the files; a later trial on the same data decodes nothing."""
    from tests.helpers import trial_config
    from trainables.finetune import TrialContext, train_and_evaluate

    opts = {**F.write_image_csv(tmp_path / "csv", n=600), "num_workers": 0}
    point = {"backbone": "test_resnet", "paradigm": "scratch", "intervention": "correlation", "magnitude": 0.7,
             "freeze_depth": 0, "seed": 0}
    ft = {"size": 60, "epochs": 2, "batch_size": 16, "lr": 0.02, "weight_decay": 0.0, "momentum": 0.9,
          "threshold": "calibrated"}
    context = TrialContext(dataset="image_csv", dataset_options=opts, cache_root="/none", bootstrap=0)
    streamed = train_and_evaluate(trial_config(point, ft), context)
    decoded = []
    real = images.decode_pixels
    monkeypatch.setattr(images, "decode_pixels", lambda path, pre: decoded.append(path) or real(path, pre))
    context = replace(context, input_cache=str(tmp_path / "decoded"))
    cached = train_and_evaluate(trial_config(point, ft), context)
    for name in ("accuracy", "auroc", "equalized_odds_difference", "val_loss", "train_loss", "threshold"):
        assert cached[name] == streamed[name], name
    n = sum(len(build_dataset("image_csv", opts).meta(s)) for s in ("finetune", "val", "test"))
    assert len(decoded) == n  # each file of the splits a trial reads, once
    train_and_evaluate(trial_config({**point, "magnitude": 0.5}, {**ft, "epochs": 1}), context)
    assert len(decoded) == n
    # a budget too small for any split (resources.input_cache_gb): every split streams from its files again
    tight = replace(context, input_cache=str(tmp_path / "tight"), input_cache_bytes=1024)
    again = train_and_evaluate(trial_config(point, ft), tight)
    assert again["accuracy"] == streamed["accuracy"] and len(decoded) > n  # decoded again, not read from a cache
    assert not list((tmp_path / "tight").glob("*.npy"))
    assert Resources().input_cache_bytes == images.DECODED_BUDGET_BYTES  # the spec's default is the module's


def test_pretraining_decodes_within_the_sweeps_budget(tmp_path):
    """Launch hands each pretraining job the folder and budget of the decoded-image cache
    (resources.input_cache_gb): within it the source split is decoded into the cache, beyond it streamed."""
    from orchestrator.plan import build_plan
    from orchestrator.spec import parse_spec
    from tests.helpers import tiny_spec
    from trainables.pretrain import run_pretrain_job

    opts = {**F.write_image_csv(tmp_path / "csv", n=200), "num_workers": 0}
    spec = parse_spec(tiny_spec(**{"dataset": {"name": "image_csv", "options": opts}, "axes.paradigm": ["supervised"],
                                   "finetune.size": 30, "resources.input_cache_gb": 1e-6}))  # 1 KiB: no split fits
    (job,) = build_plan(spec).pretrain_jobs
    tight = run_pretrain_job(job.to_dict(), str(tmp_path / "a"), 1, str(tmp_path / "tight"),
                             spec.resources.input_cache_bytes)
    assert spec.resources.input_cache_bytes == 1073 and not list((tmp_path / "tight").glob("*.npy"))
    roomy = run_pretrain_job(job.to_dict(), str(tmp_path / "b"), 1, str(tmp_path / "roomy"),
                             Resources().input_cache_bytes)
    assert len(list((tmp_path / "roomy").glob("*.npy"))) == 1  # the source split, decoded once
    assert roomy.losses == tight.losses  # the same pixels either way
