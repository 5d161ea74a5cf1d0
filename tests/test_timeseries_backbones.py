"""1-D backbones: timm's contract, paper B's architecture and freezing setups, every paradigm on them."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.helpers import trial_config
from trainables import backbones as B
from trainables.finetune import TrialContext, train_and_evaluate
from trainables.paradigms import PARADIGMS
from trainables.pretrain import run_pretrain_job
from trainables.pretrain_cache import PretrainCache
from trainables.trial import Freeze

NAMES = ("cnn1d_paperb", "cnn1d_tiny", "transformer1d_tiny")
SHAPE = (5, 101)  # MESA's windows in paper B: 101 samples of 5 channels


@pytest.mark.parametrize("name", NAMES)
def test_timm_contract(name: str) -> None:
    torch.manual_seed(0)
    model = B.create_backbone(name, num_classes=2, input_shape=SHAPE).eval()
    x = torch.randn(4, *SHAPE)
    feats = model.forward_features(x)
    pooled = model.forward_head(feats, pre_logits=True)
    assert pooled.shape == (4, model.num_features) and model(x).shape == (4, 2)
    assert torch.allclose(model.forward_head(feats), model.get_classifier()(pooled))
    groups = B.layer_groups(model)
    assert groups.n == 3 == B.count_layer_groups(name, SHAPE)
    head = {n for n, _ in model.get_classifier().named_parameters()}
    assert {n.split(".", 1)[1] for n in groups.head} == head
    covered = {n for g in groups.params for n in g} | set(groups.head)
    assert covered == {n for n, _ in model.named_parameters()}


def test_paper_b_architecture() -> None:
    """Paper B's code (simclr_models.py, supervised_models.py): conv 32/24, 64/16, 96/8 with 'same' padding,
    ReLU and dropout 0.1; global max pooling; head Dense(128, ReLU) -> Dropout(0.6) -> Dense(classes)."""
    model = B.create_backbone("cnn1d_paperb", num_classes=2, input_shape=SHAPE)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv1d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0]) for c in convs] == [(5, 32, 24), (32, 64, 16), (64, 96, 8)]
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.1, 0.1, 0.1, 0.6]
    linears = [m for m in model.get_classifier().modules() if isinstance(m, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(96, 128), (128, 2)]
    assert [type(m).__name__ for m in model.get_classifier()] == ["Linear", "ReLU", "Dropout", "Linear"]
    x = torch.randn(2, *SHAPE)
    model.eval()  # dropout off
    assert torch.equal(model.forward_head(model.forward_features(x), pre_logits=True),
                       model.forward_features(x).amax(dim=-1))  # global max pooling
    assert B.layer_groups(model).names == ("stem", "blocks.0", "blocks.1")
    # Keras' initialisers: zero biases (torch's default draws them at random)
    assert all(torch.count_nonzero(c.bias) == 0 for c in convs) and all(torch.count_nonzero(lin.bias) == 0 for lin in linears)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # the reference below; ours pads itself
@pytest.mark.parametrize("length", [1, 8, 23, 24, 101, 128])
def test_paper_b_same_padding_keeps_every_length(length: int) -> None:
    """Keras 'same' keeps the time axis through every conv, even the 24-sample kernel on a shorter input;
    an even kernel pads (k - 1) // 2 on the left and the rest on the right, as torch's padding='same' does."""
    model = B.create_backbone("cnn1d_paperb", num_classes=2, input_shape=(5, length)).eval()
    x = torch.randn(3, 5, length)
    out = model.stem(x)
    assert out.shape == (3, 32, length)
    assert model.forward_features(x).shape == (3, 96, length) and model(x).shape == (3, 2)
    conv = model.stem[0]
    with torch.no_grad():
        reference = nn.functional.conv1d(x, conv.weight, conv.bias, padding="same")
    assert torch.allclose(conv(x), reference, atol=1e-5)


def test_paper_b_l2_penalties_become_per_parameter_weight_decay() -> None:
    """l2(1e-4) on each conv kernel and l2(1e-2) on the Dense(128) kernel (paper B's kernel_regularizer): as
    SGD weight decay 2λ on top of the sweep's, none on biases, the last layer or frozen parameters."""
    model = B.create_backbone("cnn1d_paperb", num_classes=2, input_shape=SHAPE)
    groups = B.layer_groups(model)
    B.apply_freeze(model, groups, Freeze.parse((1,)))  # middle conv frozen
    decay = {id(p): g["weight_decay"] for g in B.param_groups(model, 0.001) for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = {names[i]: wd for i, wd in decay.items()}
    assert by_name == {"stem.0.weight": pytest.approx(0.001 + 2e-4), "stem.0.bias": 0.001,
                       "blocks.1.0.weight": pytest.approx(0.001 + 2e-4), "blocks.1.0.bias": 0.001,
                       "head.0.weight": pytest.approx(0.001 + 2e-2), "head.0.bias": 0.001,
                       "head.3.weight": 0.001, "head.3.bias": 0.001}
    # the decay a step applies is the gradient of λ·Σw²: with a zero loss, w -= lr · 2λ · w
    w = model.head[0].weight.detach().clone()
    opt = torch.optim.SGD(B.param_groups(model, 0.0), lr=0.1)
    (0 * model(torch.randn(2, *SHAPE)).sum()).backward()
    opt.step()
    assert torch.allclose(model.head[0].weight, w * (1 - 0.1 * 2 * 1e-2))
    # models without penalties: one group, the sweep's decay for every trainable parameter
    tiny = B.create_backbone("cnn1d_tiny", num_classes=2, input_shape=SHAPE)
    assert [g["weight_decay"] for g in B.param_groups(tiny, 0.01)] == [0.01]


# paper B's setups: nothing, first conv, middle conv, first two, first and last, all three (a probe)
SETUPS = [("full", set()), (1, {"stem"}), ((1,), {"blocks.0"}), (2, {"stem", "blocks.0"}),
          ((0, 2), {"stem", "blocks.1"}), (3, {"stem", "blocks.0", "blocks.1"}),
          ("linear", {"stem", "blocks.0", "blocks.1"})]


@pytest.mark.parametrize("spec,frozen_layers", SETUPS)
def test_paper_b_freezing_setups(spec, frozen_layers: set[str]) -> None:
    model = B.create_backbone("cnn1d_paperb", num_classes=2, input_shape=SHAPE)
    groups = B.layer_groups(model)
    info = B.apply_freeze(model, groups, Freeze.parse(spec))
    frozen = {".".join(n.split(".")[:2]) if n.startswith("blocks") else n.split(".")[0]
              for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == frozen_layers
    assert all(p.requires_grad for p in model.get_classifier().parameters())
    # frozen layers stay in eval mode while training (their dropout is off); the others train
    B.set_train_mode(model, info)
    for layer in ("stem", "blocks.0", "blocks.1"):
        assert all(m.training == (layer not in frozen_layers) for m in model.get_submodule(layer).modules()), layer
    # a training step moves only what is not frozen
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    nn.functional.cross_entropy(model(torch.randn(8, *SHAPE)), torch.randint(0, 2, (8,))).backward()
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (not p.requires_grad), n


def test_shape_errors_teach() -> None:
    assert B.create_backbone("cnn1d_tiny", num_classes=2, input_shape=(3, 16))(torch.randn(1, 3, 16)).shape == (1, 2)
    with pytest.raises(B.BackboneError, match=r"1-D model; input_shape must be \(channels, length\)"):
        B.create_backbone("cnn1d_tiny", num_classes=2, input_shape=(3, 32, 32))
    with pytest.raises(B.BackboneError, match="for time series .* use a 1-D backbone: .*cnn1d_paperb"):
        B.create_backbone("test_resnet", num_classes=2, input_shape=(3, 64))
    with pytest.raises(B.BackboneError, match="did you mean 'cnn1d_tiny'"):
        B.create_backbone("cnn1d_tiyn", num_classes=2, input_shape=(3, 64))


@pytest.mark.parametrize("name", NAMES)
def test_backbone_state_round_trips_into_a_fresh_head(name: str) -> None:
    a = B.create_backbone(name, num_classes=4, input_shape=SHAPE)
    b = B.create_backbone(name, num_classes=2, input_shape=SHAPE)
    state = B.backbone_state_dict(a)
    assert not any(k.startswith("head") for k in state)
    B.load_backbone_state(b, state)
    x = torch.randn(2, *SHAPE)
    a.eval(), b.eval()
    assert torch.allclose(a.forward_features(x), b.forward_features(x))


OPTS = {"n_source": 64, "n_finetune": 96, "n_val": 24, "n_test": 48, "length": 48}


@pytest.mark.parametrize("paradigm,options", [("supervised", {}), ("biased", {}), ("control", {"label": "device"}),
                                              ("simclr", {}), ("vicreg", {"projection_dim": 16}), ("byol", {})])
def test_every_label_free_and_supervised_paradigm_pretrains_a_1d_backbone(tmp_path, paradigm: str, options: dict) -> None:
    import numpy as np

    from trainables.data import build_dataset

    ds = build_dataset("synthetic_timeseries", OPTS)
    PARADIGMS.get(paradigm).check(ds, options)
    PARADIGMS.get(paradigm).check_backbone("cnn1d_tiny", ds)
    job = {"key": f"k-{paradigm}", "backbone": "cnn1d_tiny", "paradigm": paradigm, "dataset": "synthetic_timeseries",
           "dataset_options": OPTS, "hparams": {"epochs": 1, "batch_size": 32, "lr": 0.01, "weight_decay": 0.0,
                                                "momentum": 0.9, "seed": 0, "options": options}}
    out = run_pretrain_job(job, str(tmp_path))
    assert len(out.losses) == 1 and np.isfinite(out.losses[0])
    state = PretrainCache(str(tmp_path)).load(job["key"])
    assert "stem.0.weight" in state and not any(k.startswith("head") for k in state)


def test_image_only_paradigms_refuse_time_series() -> None:
    from trainables.data import build_dataset

    ds = build_dataset("synthetic_timeseries", OPTS)
    for name in ("mae", "timm"):
        with pytest.raises(ValueError, match="supports image data, not timeseries"):
            PARADIGMS.get(name).check(ds, {})


def test_finetuning_starts_from_the_pretrained_encoder(tmp_path) -> None:
    job = {"key": "simclr-key", "backbone": "cnn1d_tiny", "paradigm": "simclr", "dataset": "synthetic_timeseries",
           "dataset_options": OPTS, "hparams": {"epochs": 1, "batch_size": 32, "lr": 0.01, "weight_decay": 0.0,
                                                "momentum": 0.9, "seed": 0, "options": {}}}
    run_pretrain_job(job, str(tmp_path))
    ft = {"size": 32, "epochs": 1, "batch_size": 16, "lr": 0.01, "weight_decay": 0.0, "momentum": 0.9, "threshold": 0.5}
    ctx = TrialContext("synthetic_timeseries", OPTS, str(tmp_path))
    trial = trial_config({"backbone": "cnn1d_tiny", "paradigm": "simclr", "intervention": "correlation",
                          "magnitude": 0.5, "freeze_depth": "linear", "seed": 0}, ft, weights_key="simclr-key")
    r = train_and_evaluate(trial, ctx)
    assert r["pretrain_ref"] == "simclr-key" and r["frozen_groups"] == "[0, 1, 2]" and r["frozen_fraction"] > 0.5


def test_time_warp_is_a_monotone_resampling_that_keeps_the_ends() -> None:
    from trainables.ssl import time_warp

    torch.manual_seed(0)
    ramp = torch.arange(64, dtype=torch.float32).repeat(8, 3, 1)  # (8, 3, 64): value = time step
    warped = time_warp(ramp, strength=0.3)
    assert warped.shape == ramp.shape
    assert torch.allclose(warped[..., 0], ramp[..., 0]) and torch.allclose(warped[..., -1], ramp[..., -1])
    assert (warped.diff(dim=-1) >= -1e-5).all()  # a warp of time never runs backwards
    assert not torch.allclose(warped, ramp)  # and it does move the middle
    assert torch.equal(warped[:, 0], warped[:, 1])  # the same warp for every channel of an example
    assert torch.equal(time_warp(ramp, strength=0.0), ramp)


@pytest.mark.parametrize("paradigm", ["simclr", "vicreg", "byol"])
def test_timeseries_views_differ_but_keep_shape_and_stay_finite(paradigm: str) -> None:
    from trainables.ssl import augmenter

    torch.manual_seed(0)
    views = augmenter("timeseries", PARADIGMS.get(paradigm).resolve_options({}))
    x = torch.randn(16, 5, 101)  # MESA-like: 5 channels x 101 steps
    a, b = views(x), views(x)
    assert a.shape == b.shape == x.shape and torch.isfinite(a).all() and not torch.allclose(a, b)
