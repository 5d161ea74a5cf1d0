"""Linear CKA between the layer groups of two models: paper B's representation analysis.

Centered kernel alignment (Kornblith et al., ICML 2019) with a linear kernel compares two
representations of the same n examples, ``X`` (n, p) and ``Y`` (n, q), through their Gram matrices
``K = X Xᵀ`` and ``L = Y Yᵀ``::

    CKA(X, Y) = HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L))

It is 1 for identical representations and invariant to orthogonal transforms and isotropic scaling of
either, but not to arbitrary invertible linear maps. Two estimators of HSIC:

* ``debiased=True`` (the default): the unbiased estimator of Song et al. (JMLR 2012, eq. 5), the one paper
  B computes (``unbiased_HSIC`` and ``CKA`` in ``code/baselines/representation_similarity_utilities.py``
  of Nokia-Bell-Labs/SSLfairness); it needs n >= 4 and stays near 0 for unrelated representations even
  when the feature count dwarfs n, as it does for flattened conv outputs;
* ``debiased=False``: the plug-in estimator, ``<HKH, HLH>`` with the centering matrix H.

Paper B flattens every layer's output to (n, everything else) and compares each layer of one model with
each layer of the other on the examples of one demographic group; ``layer_group_outputs`` does the same
for fairsweep's layer groups (``backbones.layer_groups``: a 1-D CNN's three conv blocks, a ResNet's
stages) by forward hooks, so the comparison speaks the vocabulary freezing speaks. Everything here is a
pure function of arrays and models; ``orchestrator/similarity.py`` reads the trials from MLflow.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import numpy as np

from trainables.backbones import BackboneError, layer_groups, outermost_modules_within

if TYPE_CHECKING:  # torch is imported lazily so that importing this module stays cheap
    import torch
    from torch import nn

__all__ = ["gram", "hsic", "linear_cka", "cka_matrix", "group_modules", "layer_group_outputs"]


def gram(x: np.ndarray) -> np.ndarray:
    """The linear-kernel Gram matrix ``x xᵀ`` of (n, ...) features, flattened to (n, features), in float64."""
    flat = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    return flat @ flat.T


def hsic(k: np.ndarray, l: np.ndarray, *, debiased: bool = True) -> float:  # noqa: E741 - the paper's names
    """HSIC of two (n, n) Gram matrices, up to a factor that cancels in CKA for the plug-in estimator."""
    n = len(k)
    if k.shape != (n, n) or l.shape != (n, n):
        raise ValueError(f"Gram matrices must be square and of one size; got {k.shape} and {l.shape}")
    if not debiased:
        kc = k - k.mean(axis=0, keepdims=True) - k.mean(axis=1, keepdims=True) + k.mean()
        lc = l - l.mean(axis=0, keepdims=True) - l.mean(axis=1, keepdims=True) + l.mean()
        return float((kc * lc).sum())
    if n < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 examples, got {n}; use more examples or debiased=False")
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0.0)
    np.fill_diagonal(lt, 0.0)
    k1, l1 = kt.sum(axis=1), lt.sum(axis=1)  # K̃1 and L̃1
    trace = float((kt * lt).sum())  # tr(K̃ L̃) for symmetric matrices
    middle = float(k1.sum() * l1.sum()) / ((n - 1) * (n - 2))
    last = 2.0 * float(k1 @ l1) / (n - 2)
    return (trace + middle - last) / (n * (n - 3))


def _cka_from_grams(k: np.ndarray, l: np.ndarray, kk: float, ll: float, debiased: bool) -> float:  # noqa: E741
    denominator = kk * ll
    if not denominator > 0:  # a constant representation (e.g. a layer of dead ReLUs) has no alignment
        return math.nan
    return hsic(k, l, debiased=debiased) / math.sqrt(denominator)


def linear_cka(x: np.ndarray, y: np.ndarray, *, debiased: bool = True) -> float:
    """Linear CKA of two representations of the same examples, (n, ...) each; NaN when either is constant."""
    if len(x) != len(y):
        raise ValueError(f"CKA compares representations of the same examples; got {len(x)} and {len(y)} rows")
    k, l = gram(x), gram(y)  # noqa: E741
    return _cka_from_grams(k, l, hsic(k, k, debiased=debiased), hsic(l, l, debiased=debiased), debiased)


def cka_matrix(xs: Sequence[np.ndarray], ys: Sequence[np.ndarray], *, debiased: bool = True) -> np.ndarray:
    """CKA of every representation in ``xs`` (rows) with every one in ``ys`` (columns): paper B's
    layer-by-layer heatmap. Each Gram matrix is built once."""
    ks, ls = [gram(x) for x in xs], [gram(y) for y in ys]
    if len({len(k) for k in [*ks, *ls]}) > 1:
        raise ValueError("CKA compares representations of the same examples; the inputs have different row counts")
    kk = [hsic(k, k, debiased=debiased) for k in ks]
    ll = [hsic(m, m, debiased=debiased) for m in ls]
    return np.array([[_cka_from_grams(k, m, kk[i], ll[j], debiased) for j, m in enumerate(ls)]
                     for i, k in enumerate(ks)], dtype=np.float64).reshape(len(ks), len(ls))


# ----------------------------------------------------------------------------------- features


def group_modules(model: nn.Module) -> tuple[tuple[str, ...], ...]:
    """Per non-head layer group, the outermost modules whose parameters all belong to it.

    A group's output is what the last of them to run returns; for ``cnn1d_paperb`` that is each conv
    block (conv, ReLU, dropout), i.e. the activation paper B reads from each Keras ``Conv1D`` layer.
    """
    groups = layer_groups(model)
    out = []
    for g, names in enumerate(groups.params):
        mods = outermost_modules_within(model, set(names))
        if not mods:
            raise BackboneError(f"layer group {g} ({groups.names[g]}) of {type(model).__name__} holds only root-level "
                                "parameters, so no module's output represents it; CKA needs a module per group")
        out.append(tuple(mods))
    return tuple(out)


def layer_group_outputs(model: nn.Module, x: torch.Tensor, *, batch_size: int = 256,
                        device: torch.device | str = "cpu") -> tuple[list[np.ndarray], np.ndarray]:
    """Every layer group's output on ``x`` (a list of (n, features) float32 arrays, in group order) and the
    model's P(class 1) per example, in eval mode and float32 (no autocast: CKA compares small differences)."""
    import torch  # torch only where a model runs; the CKA math takes numpy arrays

    modules = group_modules(model)
    model = model.to(device).eval()
    latest: dict[int, torch.Tensor] = {}

    def hook(g: int):
        def keep(_module: nn.Module, _inputs: tuple, output: torch.Tensor | tuple) -> None:
            out = output[0] if isinstance(output, (tuple, list)) else output
            latest[g] = out.detach().float().flatten(1).cpu()  # the last module of the group to run wins

        return keep

    handles = [model.get_submodule(name).register_forward_hook(hook(g))
               for g, names in enumerate(modules) for name in names]
    chunks: list[list[torch.Tensor]] = [[] for _ in modules]
    scores: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                latest.clear()
                logits = model(x[start:start + batch_size].to(device).float())
                scores.append(torch.softmax(logits.float(), dim=1)[:, 1].cpu())
                for g in range(len(modules)):
                    chunks[g].append(latest[g])
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(c).numpy() for c in chunks], torch.cat(scores).numpy()
