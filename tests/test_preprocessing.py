"""Folder images reach each model preprocessed by its own timm data config, and pretraining keys say so.

test_resnet's config normalises with mean = std = 0.5 (not ImageNet's), crops 0.95 and resizes
bilinearly; test_efficientnet's uses ImageNet statistics and bicubic resizing. Solid-colour images make
the expected pixels exact: every pixel of a file of colour c is (c / 255 - mean) / std after any resize.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from orchestrator.plan import build_plan
from orchestrator.spec import parse_spec
from tests.helpers import tiny_spec
from trainables import backbones, pretrain
from trainables.data import build_dataset
from trainables.data.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

HALF = np.array([0.5, 0.5, 0.5], dtype=np.float32)
IMNET_MEAN, IMNET_STD = np.array(IMAGENET_MEAN, dtype=np.float32), np.array(IMAGENET_STD, dtype=np.float32)


def _write_solid_folder(root: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """An image_csv layout of 20 solid-colour 30x20 PNGs (5 per label x group cell); returns the
    dataset options and each file's colour (uint8 RGB) by absolute path."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    rows, colours = [], {}
    for i in range(20):
        label, group = i % 2, (i // 2) % 2
        colour = rng.integers(0, 256, size=3, dtype=np.uint8)
        rel = f"img/{i:02d}.png"
        Image.fromarray(np.broadcast_to(colour, (20, 30, 3)).copy()).save(root / rel)
        colours[str(root / rel)] = colour
        rows.append({"path": rel, "label": label, "group": ("a", "b")[group],
                     "split": ("train", "train", "train", "val", "test")[i // 4]})
    pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
    return {"root": str(root), "image_size": 16, "num_workers": 0}, colours


@pytest.fixture()
def solid(tmp_path):
    return _write_solid_folder(tmp_path / "solid")


def _expected(paths, colours, mean, std) -> torch.Tensor:
    per_file = np.stack([(colours[p] / 255.0 - mean) / std for p in paths]).astype(np.float32)
    return torch.from_numpy(np.broadcast_to(per_file[:, :, None, None], (len(paths), 3, 16, 16)).copy())


def _folder_spec(root_opts: dict, **overrides) -> dict:
    return tiny_spec(**{"dataset": {"name": "image_csv", "options": root_opts},
                        "axes.intervention": {"kind": "none", "magnitudes": [0.5]}, "axes.freeze_depth": [0],
                        "finetune.size": 4, "finetune.batch_size": 4, "pretraining.batch_size": 4, **overrides})


# ----------------------------------------------------------------------------------- the configs


def test_data_config_is_the_models_own_at_the_datasets_size() -> None:
    resnet = backbones.data_config("test_resnet", (3, 16, 16))
    assert resnet == Preprocessing((3, 16, 16), (0.5,) * 3, (0.5,) * 3, "bilinear", 0.95, "center")
    effnet = backbones.data_config("test_efficientnet", (3, 16, 16))
    assert (effnet.mean, effnet.std, effnet.interpolation) == (IMAGENET_MEAN, IMAGENET_STD, "bicubic")
    clip = backbones.data_config("vit_base_patch16_clip_224.openai", (3, 32, 32))  # a tag picks its config
    assert clip.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073)) and clip.input_size == (3, 32, 32)
    assert backbones.data_config("cnn1d_tiny", (3, 64)) is None  # time series: no image preprocessing
    assert '"mean":[0.5,0.5,0.5]' in resnet.canonical() and '"crop_pct":0.95' in resnet.canonical()


def test_bad_configs_are_refused_naming_the_value() -> None:
    with pytest.raises(ValueError, match=r"std \(0.5, 0.0, 0.5\) must be positive"):
        Preprocessing((3, 8, 8), std=(0.5, 0.0, 0.5))
    with pytest.raises(ValueError, match="interpolation 'cubic' is not one of"):
        Preprocessing((3, 8, 8), interpolation="cubic")
    with pytest.raises(ValueError, match=r"has 1 channels; .* in_chans=3"):
        Preprocessing((1, 8, 8))
    with pytest.raises(ValueError, match="lacks mean, std"):
        Preprocessing.from_config({"input_size": (3, 8, 8)})


# ----------------------------------------------------------------------------------- the pixels


def test_view_normalises_with_the_models_mean_and_std(solid) -> None:
    opts, colours = solid
    ds = build_dataset("image_csv", opts)
    view = ds.for_model(backbones.data_config("test_resnet", ds.input_shape))
    paths = list(ds.paths("test"))
    half = view.inputs("test")
    assert torch.allclose(half, _expected(paths, colours, HALF, HALF), atol=1e-5)
    # the dataset itself still gives ImageNet statistics, and they differ from the model's
    base = ds.inputs("test")
    assert torch.allclose(base, _expected(paths, colours, IMNET_MEAN, IMNET_STD), atol=1e-5)
    assert (half - base).abs().max() > 0.1
    # streamed batches (worker processes) apply the same config
    got = torch.empty_like(half)
    for xb, pos in view.loader("test", batch_size=2, num_workers=1):
        got[pos] = xb
    assert torch.equal(got, half)
    # an ImageNet-statistics model gets ImageNet-normalised pixels
    imnet = ds.for_model(backbones.data_config("test_efficientnet", ds.input_shape)).inputs("test")
    assert torch.allclose(imnet, base, atol=1e-5)


def test_view_resizes_and_crops_exactly_as_timms_eval_transform(tmp_path) -> None:
    import timm
    from PIL import Image
    from timm.data import create_transform, resolve_model_data_config

    opts, _ = _write_solid_folder(tmp_path / "noisy")
    ds = build_dataset("image_csv", opts)
    path = ds.paths("val")[0]
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(path)  # detail
    model = timm.create_model("test_convnext", pretrained=False)  # bicubic, crop 0.95, mean/std 0.5
    config = resolve_model_data_config(model, args={"input_size": (3, 16, 16)})
    want = create_transform(**config)(Image.open(path).convert("RGB"))
    got = ds.for_model(config).inputs("val", np.array([0]))[0]
    assert torch.allclose(got, want, atol=1e-6)
    plain = ds.inputs("val", np.array([0]))[0] * torch.tensor(IMNET_STD)[:, None, None] + \
        torch.tensor(IMNET_MEAN)[:, None, None]
    assert not torch.allclose(got * 0.5 + 0.5, plain, atol=0.02)  # the crop and filter changed the pixels too
    # a raw timm config keeps its own input size: the view's shape follows it
    native = ds.for_model(resolve_model_data_config(model))
    assert native.input_shape == (3, 160, 160) and native.inputs("val", np.array([0])).shape == (1, 3, 160, 160)


def test_fingerprints_name_the_preprocessing_and_generated_data_is_untouched(solid) -> None:
    opts, _ = solid
    ds = build_dataset("image_csv", opts)
    view = ds.for_model(backbones.data_config("test_resnet", ds.input_shape))
    assert view.fingerprint() != ds.fingerprint()  # caches keyed by fingerprints (features, inputs) tell them apart
    assert ds.fingerprint().endswith(ds.preprocessing_record()) and view.fingerprint().endswith(view.preprocessing_record())
    assert ds.for_model(None) is ds and ds.for_model(ds.preprocessing) is ds
    assert ds.preprocessing_record() != view.preprocessing_record() == backbones.data_config(
        "test_resnet", (3, 16, 16)).canonical()
    synthetic = build_dataset("synthetic_images", {"n_source": 40, "n_finetune": 40, "n_val": 40, "n_test": 40})
    assert synthetic.for_model(backbones.data_config("test_resnet", synthetic.input_shape)) is synthetic
    assert synthetic.preprocessing_record() == "" and pretrain.preprocessing_part(synthetic, "test_resnet") == {}


# ----------------------------------------------------------------------------------- pretraining


def test_pretraining_key_includes_the_preprocessing_and_synthetic_keys_do_not(solid, monkeypatch) -> None:
    opts, _ = solid
    (job,) = build_plan(parse_spec(_folder_spec(opts, **{"axes.paradigm": ["supervised"]}))).pretrain_jobs
    assert job.hparams.preprocessing == backbones.data_config("test_resnet", (3, 16, 16)).canonical()
    # the same backbone under another preprocessing (say a newer timm's config) is another base
    imagenet = Preprocessing((3, 16, 16), interpolation="bilinear", crop_pct=0.95)
    monkeypatch.setattr(backbones, "data_config", lambda name, shape: imagenet)
    (other,) = build_plan(parse_spec(_folder_spec(opts, **{"axes.paradigm": ["supervised"]}))).pretrain_jobs
    assert other.key != job.key and other.hparams.preprocessing == imagenet.canonical()
    monkeypatch.undo()
    # generated data: no preprocessing in the job, so its key is the one it always had
    (syn,) = build_plan(parse_spec(tiny_spec(**{"axes.paradigm": ["supervised"]}))).pretrain_jobs
    assert syn.hparams.preprocessing is None and "preprocessing" not in syn.hparams.to_dict()


def test_pretraining_feeds_the_model_its_own_normalisation(solid, tmp_path, monkeypatch) -> None:
    opts, colours = solid
    (job,) = build_plan(parse_spec(_folder_spec(opts, **{"axes.paradigm": ["supervised"]}))).pretrain_jobs
    seen: list[torch.Tensor] = []
    create = backbones.create_backbone

    def recording(*args, **kwargs):
        model = create(*args, **kwargs)
        model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach().clone()))
        return model

    monkeypatch.setattr(backbones, "create_backbone", recording)
    out = pretrain.run_pretrain_job(job.to_dict(), str(tmp_path / "cache"))
    assert seen and out.meta["hparams"]["preprocessing"] == job.hparams.preprocessing
    allowed = {tuple(np.round((c / 255.0 - 0.5) / 0.5, 4)) for c in colours.values()}
    for batch in seen:  # every image the model saw is a source file normalised with 0.5 / 0.5
        for image in batch:
            assert image.std(dim=(1, 2)).max() < 1e-5
            assert tuple(np.round(image[:, 0, 0].numpy().astype(np.float64), 4)) in allowed


def test_a_worker_resolving_another_preprocessing_refuses_the_job(solid, tmp_path) -> None:
    opts, _ = solid
    (job,) = build_plan(parse_spec(_folder_spec(opts, **{"axes.paradigm": ["supervised"]}))).pretrain_jobs
    stale = {**job.to_dict(), "hparams": {**job.hparams.to_dict(), "preprocessing": Preprocessing((3, 16, 16)).canonical()}}
    with pytest.raises(ValueError, match="install the same timm version"):
        pretrain.run_pretrain_job(stale, str(tmp_path / "cache"))


def test_timm_paradigm_base_is_keyed_by_its_preprocessing(solid, tmp_path, monkeypatch) -> None:
    from tests.test_paradigms import _fake_hf_cache

    opts, _ = solid
    _fake_hf_cache(tmp_path / "hf")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    (job,) = build_plan(parse_spec(_folder_spec(opts, **{"axes.paradigm": ["timm"]}))).pretrain_jobs
    assert '"mean":[0.5,0.5,0.5]' in job.hparams.preprocessing
    out = pretrain.run_pretrain_job(job.to_dict(), str(tmp_path / "cache"))
    assert out.meta["hparams"]["preprocessing"] == job.hparams.preprocessing
