"""Linear CKA (trainables/cka.py): its defining properties, two independent formulas, and the layer-group
features it reads from a model by forward hooks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainables import backbones as B
from trainables.cka import cka_matrix, gram, group_modules, hsic, layer_group_outputs, linear_cka

RNG = np.random.default_rng(0)
X = RNG.standard_normal((60, 12))
Y = X @ RNG.standard_normal((12, 7)) + 0.5 * RNG.standard_normal((60, 7))  # related to X, not a rotation of it


def _orthogonal(d: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def _feature_space_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al.'s eq. (4), computed on the features: ||YcᵀXc||²_F / (||XcᵀXc||_F ||YcᵀYc||_F)."""
    xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
    return float(np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)))


def _u_centered_cka(x: np.ndarray, y: np.ndarray) -> float:
    """The debiased CKA through U-centering (Székely & Rizzo 2014), the other form paper B's utilities hold
    (``center_gram(unbiased=True)``): a different computation of the same unbiased HSIC."""

    def u_center(k: np.ndarray) -> np.ndarray:
        n = len(k)
        k = k.copy()
        np.fill_diagonal(k, 0.0)
        means = k.sum(axis=0) / (n - 2)
        means -= means.sum() / (2 * (n - 1))
        k = k - means[:, None] - means[None, :]
        np.fill_diagonal(k, 0.0)
        return k

    k, l = u_center(x @ x.T), u_center(y @ y.T)  # noqa: E741
    return float((k * l).sum() / (np.linalg.norm(k) * np.linalg.norm(l)))


@pytest.mark.parametrize("debiased", [True, False])
def test_cka_of_a_representation_with_itself_is_one(debiased: bool) -> None:
    assert linear_cka(X, X, debiased=debiased) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("debiased", [True, False])
def test_invariant_to_orthogonal_transforms_and_isotropic_scaling(debiased: bool) -> None:
    base = linear_cka(X, Y, debiased=debiased)
    assert 0.2 < base < 0.99  # related, not identical: the invariances below are not trivially 1 = 1
    assert linear_cka(X @ _orthogonal(12, 1), Y, debiased=debiased) == pytest.approx(base, abs=1e-10)
    assert linear_cka(X, Y @ _orthogonal(7, 2), debiased=debiased) == pytest.approx(base, abs=1e-10)
    assert linear_cka(3.7 * X, 0.01 * Y, debiased=debiased) == pytest.approx(base, abs=1e-10)
    # but not to an anisotropic rescaling of the features: CKA is no CCA
    stretch = np.diag(np.linspace(0.1, 10.0, 12))
    assert abs(linear_cka(X @ stretch, Y, debiased=debiased) - base) > 0.05


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_direct_formulas_on_random_matrices(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, p, q = rng.integers(8, 80), rng.integers(2, 40), rng.integers(2, 40)
    x = rng.standard_normal((n, p)) + rng.standard_normal(p)  # uncentred on purpose: CKA centres
    y = np.tanh(x @ rng.standard_normal((p, q))) + rng.standard_normal((n, q))
    assert linear_cka(x, y, debiased=False) == pytest.approx(_feature_space_cka(x, y), rel=1e-9)
    assert linear_cka(x, y, debiased=True) == pytest.approx(_u_centered_cka(x, y), rel=1e-9)


def test_unbiased_estimate_of_unrelated_wide_representations_stays_near_zero() -> None:
    """Why paper B's estimator is the default: with many more features than examples (flattened conv
    outputs), the plug-in CKA of independent noise is far from 0; the unbiased one is not."""
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((40, 2000)), rng.standard_normal((40, 2000))
    assert linear_cka(a, b, debiased=False) > 0.5
    assert abs(linear_cka(a, b, debiased=True)) < 0.1


def test_matrix_is_every_pair_and_nan_for_a_constant_representation() -> None:
    layers_a, layers_b = [X, Y, np.zeros_like(X)], [Y, X]
    m = cka_matrix(layers_a, layers_b)
    assert m.shape == (3, 2)
    assert m[0, 1] == pytest.approx(1.0) and m[1, 0] == pytest.approx(1.0)
    assert m[0, 0] == pytest.approx(linear_cka(X, Y)) and math.isnan(m[2, 0])
    assert gram(X.reshape(60, 3, 4)).shape == (60, 60)  # (n, channels, time) is flattened per example


def test_inputs_that_cannot_be_compared_are_errors() -> None:
    with pytest.raises(ValueError, match="same examples; got 60 and 59 rows"):
        linear_cka(X, Y[:59])
    with pytest.raises(ValueError, match="at least 4 examples, got 3"):
        hsic(gram(X[:3]), gram(Y[:3]))


def test_layer_group_outputs_are_each_conv_block_of_paper_b_cnn() -> None:
    torch.manual_seed(0)
    model = B.create_backbone("cnn1d_paperb", num_classes=2, input_shape=(3, 64))
    assert group_modules(model) == (("stem",), ("blocks.0",), ("blocks.1",))
    x = torch.randn(10, 3, 64)
    feats, scores = layer_group_outputs(model, x, batch_size=4)
    assert [f.shape for f in feats] == [(10, 32 * 64), (10, 64 * 64), (10, 96 * 64)]  # 'same' padding keeps T
    with torch.no_grad():
        expected = model.stem(x)
        assert np.allclose(feats[0], expected.flatten(1).numpy(), atol=1e-6)
        assert np.allclose(scores, torch.softmax(model(x), dim=1)[:, 1].numpy(), atol=1e-6)
    assert cka_matrix(feats, feats)[0, 0] == pytest.approx(1.0)


def test_layer_groups_of_a_timm_model_are_found_too() -> None:
    model = B.create_backbone("test_resnet", num_classes=2, input_shape=(3, 32, 32))
    mods = group_modules(model)
    assert len(mods) == B.layer_groups(model).n
    feats, _ = layer_group_outputs(model, torch.randn(6, 3, 32, 32))
    assert len(feats) == len(mods) and all(f.shape[0] == 6 for f in feats)
