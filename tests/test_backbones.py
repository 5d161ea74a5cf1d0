"""Backbones, layer groups and freezing on timm's tiny test_* models at 32 px (CPU, seconds)."""
from __future__ import annotations


import pytest
import torch
from torch import nn

from trainables import backbones as B
from trainables.registry import Registry
from trainables.schema import SchemaError
from trainables.trial import Freeze

SHAPE = (3, 32, 32)
# classifier parameter prefix and coarse non-head group count of each tiny model
MODELS = {"test_resnet": ("fc.", 5), "test_convnext": ("head.fc.", 6), "test_vit": ("head.", 7),
          "test_efficientnet": ("classifier.", 6)}


def _build(name: str, num_classes: int = 2, shape: tuple[int, ...] = SHAPE) -> nn.Module:
    torch.manual_seed(0)
    return B.create_backbone(name, num_classes=num_classes, input_shape=shape)


def _expected_groups(model: nn.Module, head_prefix: str) -> list[list[str]]:
    """Independent of the module: timm's raw coarse grouping, minus the head by name prefix."""
    from timm.models import group_parameters

    raw = group_parameters(model, model.group_matcher(coarse=True))
    groups = [[n for n in raw[g] if not n.startswith(head_prefix)] for g in sorted(raw)]
    return [g for g in groups if g]


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", list(MODELS))
def test_builds_runs_and_groups(name: str) -> None:
    head_prefix, n_expected = MODELS[name]
    model = _build(name)
    assert model(torch.randn(4, *SHAPE)).shape == (4, 2)
    groups = B.layer_groups(model)
    expected = _expected_groups(model, head_prefix)
    assert groups.n == len(expected) == n_expected
    assert [list(g) for g in groups.params] == expected
    assert set(groups.head) == {n for n, _ in model.named_parameters() if n.startswith(head_prefix)}
    assert len(groups.names) == groups.n and all(groups.names)


def test_convnext_head_norm_stays_a_group() -> None:
    groups = B.layer_groups(_build("test_convnext"))
    assert groups.names[-1] == "head.norm"
    assert set(groups.params[-1]) == {"head.norm.weight", "head.norm.bias"}
    assert set(groups.head) == {"head.fc.weight", "head.fc.bias"}


@pytest.mark.parametrize("name", list(MODELS))
def test_depth_k_freezes_exactly_the_first_k_groups(name: str) -> None:
    for k in (1, 3):
        model = _build(name)
        all_names = {n for n, _ in model.named_parameters()}
        before = dict(model.named_parameters())
        groups = B.layer_groups(model)
        info = B.apply_freeze(model, groups, Freeze.parse(k))
        frozen = {n for g in groups.params[:k] for n in g}
        assert info.frozen_groups == tuple(range(k)) and info.n_groups == groups.n
        assert _trainable(model) == all_names - frozen
        assert all(not before[n].requires_grad for n in frozen)  # converted BN params are buffers now
        total = sum(p.numel() for p in before.values())
        assert info.frozen_fraction == pytest.approx(sum(before[n].numel() for n in frozen) / total)


@pytest.mark.parametrize("name", list(MODELS))
def test_linear_leaves_only_the_classifier_trainable(name: str) -> None:
    model = _build(name)
    groups = B.layer_groups(model)
    info = B.apply_freeze(model, groups, Freeze.parse("linear"))
    assert _trainable(model) == set(groups.head)
    assert 0.0 < info.frozen_fraction < 1.0


def test_full_freezes_nothing_and_explicit_groups_may_skip() -> None:
    model = _build("test_resnet")
    groups = B.layer_groups(model)
    all_names = {n for n, _ in model.named_parameters()}
    info = B.apply_freeze(model, groups, Freeze.parse("full"))
    assert _trainable(model) == all_names and info.frozen_modules == () and info.frozen_fraction == 0.0

    model = _build("test_resnet")
    info = B.apply_freeze(model, groups, Freeze.parse((2, 0)))
    assert info.frozen_groups == (0, 2)
    assert _trainable(model) == all_names - set(groups.params[0]) - set(groups.params[2])
    assert set(groups.params[1]) <= _trainable(model)
    assert "layer1" not in info.frozen_modules and "layer2" in info.frozen_modules


def test_sgd_step_leaves_frozen_weights_and_bn_statistics_untouched() -> None:
    model = _build("test_resnet")
    groups = B.layer_groups(model)
    info = B.apply_freeze(model, groups, Freeze.parse(2))  # stem + layer1
    assert set(info.frozen_modules) == {"conv1", "bn1", "layer1"}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    B.set_train_mode(model, info)
    x, y = torch.randn(8, *SHAPE), torch.randint(0, 2, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    after = model.state_dict()
    frozen = [k for k in after if k.split(".")[0] in {"conv1", "bn1", "layer1"}]
    assert any(k.endswith("running_mean") for k in frozen)
    for k in frozen:
        assert torch.equal(before[k], after[k]), k
    # timm zero-initialises each block's last BN gamma, so check the trainable layers as a whole
    layer2 = [k for k in after if k.startswith("layer2.") and not k.endswith(("running_mean", "running_var",
                                                                              "num_batches_tracked"))]
    assert sum(not torch.equal(before[k], after[k]) for k in layer2) >= len(layer2) // 4
    assert after["layer2.0.bn1.num_batches_tracked"] == before["layer2.0.bn1.num_batches_tracked"] + 1
    assert not torch.equal(before["layer2.0.bn1.running_mean"], after["layer2.0.bn1.running_mean"])
    assert not torch.equal(before["fc.weight"], after["fc.weight"])


def test_set_train_mode_keeps_frozen_modules_in_eval() -> None:
    model = _build("test_vit")
    groups = B.layer_groups(model)
    info = B.apply_freeze(model, groups, Freeze.parse(2))
    model.eval()
    B.set_train_mode(model, info)
    assert model.training
    for name, module in model.named_modules():
        inside = any(name == f or name.startswith(f + ".") for f in info.frozen_modules)
        assert module.training != inside, name
    assert model.blocks[1].training and not model.blocks[0].training


def test_vit_root_parameters_freeze_from_depth_one() -> None:
    model = _build("test_vit")
    groups = B.layer_groups(model)
    assert {"pos_embed", "cls_token"} <= set(groups.params[0])
    B.apply_freeze(model, groups, Freeze.parse(0))
    assert model.pos_embed.requires_grad and model.cls_token.requires_grad
    B.apply_freeze(model, groups, Freeze.parse(1))
    assert not model.pos_embed.requires_grad and not model.cls_token.requires_grad
    pos = model.pos_embed.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(torch.randn(2, *SHAPE)).sum().backward()
    opt.step()
    assert torch.equal(pos, model.pos_embed)


def test_a_freeze_that_does_not_fit_the_backbone_is_refused_before_anything_freezes() -> None:
    model = B.create_backbone("test_resnet", num_classes=2, input_shape=SHAPE)
    groups = B.layer_groups(model)
    with pytest.raises(SchemaError, match=f"exceeds the {groups.n} layer groups of test_resnet") as err:
        B.apply_freeze(model, groups, Freeze.parse(groups.n + 1), backbone="test_resnet")
    assert err.value.path == "freeze_depth" and isinstance(err.value, ValueError)
    with pytest.raises(SchemaError, match=rf"holds indices \[{groups.n}\] outside"):
        B.apply_freeze(model, groups, Freeze.parse([0, groups.n]))
    assert all(p.requires_grad for p in model.parameters())


def test_count_layer_groups_matches_the_built_model() -> None:
    for name in MODELS:
        assert B.count_layer_groups(name, SHAPE) == B.layer_groups(_build(name)).n
    assert B.count_layer_groups("resnet50", (3, 224, 224)) == 5
    assert B.count_layer_groups("vit_small_patch16_224", (3, 224, 224)) == 13


def test_unknown_backbone_names_a_close_match() -> None:
    with pytest.raises(B.BackboneError, match="'test_resnt'") as err:
        B.create_backbone("test_resnt", num_classes=2, input_shape=SHAPE)
    assert "'test_resnet'" in str(err.value)
    with pytest.raises(B.BackboneError, match="num_classes 0"):
        B.create_backbone("test_resnet", num_classes=0, input_shape=SHAPE)
    with pytest.raises(B.BackboneError, match="input_shape"):
        B.create_backbone("test_resnet", num_classes=2, input_shape=(3, 32))


class _Tiny(nn.Module):
    """A custom backbone following timm's contract."""

    def __init__(self, num_classes: int, in_chans: int, matcher: bool = True):
        super().__init__()
        self.stem = nn.Conv1d(in_chans, 4, 3)
        self.fc = nn.Linear(4, num_classes)
        if not matcher:
            self.group_matcher = None  # type: ignore[assignment]

    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^stem"}

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stem(x).mean(-1))


def test_registered_backbones_come_before_timm(monkeypatch: pytest.MonkeyPatch) -> None:
    registry: Registry = Registry("backbone")
    registry.register("test_resnet")(lambda nc, c, shape: _Tiny(nc, c))
    registry.register("no_matcher")(lambda nc, c, shape: _Tiny(nc, c, matcher=False))
    monkeypatch.setattr(B, "BACKBONES", registry)
    model = B.create_backbone("test_resnet", num_classes=3, input_shape=(2, 50))
    assert isinstance(model, _Tiny) and model(torch.randn(1, 2, 50)).shape == (1, 3)
    groups = B.layer_groups(model)
    assert groups.n == 1 and groups.names == ("stem",) and groups.head == ("fc.weight", "fc.bias")
    with pytest.raises(B.BackboneError, match="group_matcher"):
        B.layer_groups(B.create_backbone("no_matcher", num_classes=3, input_shape=(2, 50)))


def test_backbone_state_round_trips_into_a_different_head() -> None:
    source = _build("test_convnext", num_classes=7)
    state = B.backbone_state_dict(source)
    assert not any(k.startswith("head.fc.") for k in state) and "head.norm.weight" in state
    target = _build("test_convnext", num_classes=2)
    head_before = target.head.fc.weight.clone()
    B.load_backbone_state(target, {"state_dict": state})
    for k, v in B.backbone_state_dict(target).items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(target.head.fc.weight, head_before)
    B.load_backbone_state(target, {"model": source.state_dict()})  # a full state dict: its head is ignored


def test_backbone_state_across_frozen_batchnorm() -> None:
    frozen = _build("test_resnet")
    groups = B.layer_groups(frozen)
    B.apply_freeze(frozen, groups, Freeze.parse("linear"))
    state = B.backbone_state_dict(frozen)  # FrozenBatchNorm2d has no num_batches_tracked
    fresh = _build("test_resnet", num_classes=4)
    B.load_backbone_state(fresh, state)
    assert torch.equal(fresh.bn1.running_var, frozen.bn1.running_var)
    B.load_backbone_state(frozen, B.backbone_state_dict(fresh))


def test_weights_of_another_architecture_raise() -> None:
    with pytest.raises(B.BackboneError, match="unexpected keys: .*missing keys"):
        B.load_backbone_state(_build("test_resnet"), B.backbone_state_dict(_build("test_convnext")))
    with pytest.raises(B.BackboneError, match=r"conv1\.0\.weight"):
        B.load_backbone_state(_build("test_resnet"), B.backbone_state_dict(_build("test_resnet", shape=(1, 32, 32))))


def test_load_weights_file(tmp_path) -> None:
    from safetensors.torch import save_file

    state = B.backbone_state_dict(_build("test_resnet"))
    pt, st = tmp_path / "w.pt", tmp_path / "w.safetensors"
    torch.save({"model": state, "epoch": torch.tensor(3)}, pt)
    save_file({k: v.contiguous() for k, v in state.items()}, str(st))
    for path in (pt, st):
        loaded = B.load_weights_file(path)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
        B.load_backbone_state(_build("test_resnet"), loaded)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    for bad, words in ((text, "not a readable checkpoint"), (tmp_path / "gone.pt", "does not exist"),
                       (tmp_path / "w.txt", "suffix"), (tmp_path / "notes.safetensors", "not a readable")):
        if bad.suffix == ".safetensors":
            bad.write_text("not a checkpoint")
        with pytest.raises(B.BackboneError, match=words) as err:
            B.load_weights_file(bad)
        assert str(bad) in str(err.value)
