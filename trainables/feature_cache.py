"""Frozen-prefix features: computed once per content key, shared by every trial of a node.

A trial whose frozen layer groups form a prefix of the network (freeze depth k: the stem and the first
stages; a linear probe: everything before the classifier) computes the same function of the same input
in every epoch, seed, intervention magnitude, finetuning size and inner-search candidate: the frozen
modules run in eval mode (``backbones.set_train_mode``) and never change, and finetuning inputs are not
augmented. So the prefix's outputs are computed once and only the trainable suffix runs, with the same
batches, the same updates, the same random draws (dropout in the suffix draws in the same order; the
prefix draws none) and the same predictions, to float rounding.

``plan_prefix`` finds where the prefix ends. It traces the model with torch.fx, descending only into the
modules that hold frozen parameters without being frozen whole (the model itself, a ``stages``
container); every other module is one opaque call. It traces twice, in the training state and in eval,
since a traced forward records ``self.training`` as a constant. The cut is a value that alone carries
everything the rest of the forward pass needs, after the last use of a frozen parameter, moved forward
over parameter-free steps that act the same in training and in eval (activations, pooling), so the cache
holds the last such value (a linear probe caches pre-logits). Nothing that trains or acts differently in
training may come before it: a trainable parameter, a module with buffers (BatchNorm outside the frozen
modules), dropout with p > 0, a step the two traces record differently (``F.dropout(training=...)``).
The plan is then checked on real inputs: the suffix on the eval-mode prefix, in the training state and
from the same random state, must reproduce the whole model to 1e-5, else the trial runs the whole model
and records why.

``FeatureCache`` keeps the outputs as ``.npy`` files under a folder the workers of a node share (the
storage path's ``_feature_cache``; ``trainables.array_cache``), read memory-mapped, within a byte budget
(a sweep's ``resources.feature_cache_gb``, ``DEFAULT_BUDGET_BYTES`` by default; least recently read entries
go first; a trial whose outputs alone exceed it runs uncached). The key is the hash of what determines the
bytes: the dataset's fingerprint, the split, the backbone, the starting weights (the pretraining key or
checkpoint; for random initialisation, the seed), the frozen groups, the cut, the device type and the
precision computed in.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import fx, nn

from trainables.array_cache import ArrayCache

__all__ = ["FeatureCache", "PrefixPlan", "plan_prefix", "compute_features", "feature_key", "DEFAULT_BUDGET_BYTES",
           "FEATURE_CACHE_DIRNAME", "LINEAR_PROBE_NOTE"]

FEATURE_CACHE_DIRNAME = "_feature_cache"
DEFAULT_BUDGET_BYTES = 4 << 30  # 4 GiB per folder (resources.feature_cache_gb); least recently read out beyond
LINEAR_PROBE_NOTE = "linear probe on cached pre-logits"
_TOLERANCE = 1e-5


def feature_key(**parts: Any) -> str:
    """sha256 of the canonical JSON of what determines the features (equal parts, equal key, any process)."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class FeatureCache(ArrayCache):
    """Prefix outputs (float32 matrices) under a node's ``_feature_cache`` folder."""

    def __init__(self, root: Any, budget_bytes: int | None = None):
        super().__init__(root, DEFAULT_BUDGET_BYTES if budget_bytes is None else budget_bytes)


class _Suffix(nn.Module):
    """The trainable rest of the network, from the cached value to the logits; shares the model's modules.

    ``train()`` puts the whole model in its training state (frozen modules in eval) and runs the graph
    traced in that state; ``eval()`` the model in eval and the graph traced so."""

    def __init__(self, train_graph: fx.GraphModule, eval_graph: fx.GraphModule, train_mode: Callable[[], None],
                 eval_mode: Callable[[], Any]):
        super().__init__()
        self.train_graph, self.eval_graph = train_graph, eval_graph
        self._modes = (eval_mode, train_mode)

    def train(self, mode: bool = True) -> _Suffix:
        self.training = mode
        self._modes[bool(mode)]()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.train_graph if self.training else self.eval_graph)(x)


@dataclass(frozen=True)
class PrefixPlan:
    """How a trial runs on cached prefix outputs: ``prefix`` (eval mode, no gradients) makes what is cached,
    ``suffix`` is what trains and predicts; both share the model's parameters."""

    prefix: nn.Module
    suffix: nn.Module
    cut: str  # the traced value the cache holds (part of the key)
    dtype: torch.dtype  # the prefix output's dtype under the trial's autocast: cached float32 goes back to it
    bytes_per_example: int  # of the cached float32 outputs


class _Tracer(fx.Tracer):
    """Traces into ``inner`` modules only; every other module is one call (timm's no-trace functions kept whole)."""

    def __init__(self, inner: frozenset[str]):
        from timm.layers import get_notrace_functions, get_notrace_modules  # timm only to trace a model

        super().__init__(autowrap_functions=tuple(get_notrace_functions()))
        self.inner = inner
        self.opaque = tuple(get_notrace_modules())

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name not in self.inner or isinstance(m, self.opaque)


def _under(name: str, modules: tuple[str, ...]) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


def _inner_modules(model: nn.Module, frozen_modules: tuple[str, ...]) -> frozenset[str]:
    """The modules to trace through: those holding frozen parameters that are not frozen whole, and those
    holding the classifier (a classifier head's pooling then counts as a step of its own)."""
    inner = {""}
    get = getattr(model, "get_classifier", None)
    heads = get() if get is not None else ()
    heads = {id(h) for h in (heads if isinstance(heads, (tuple, list)) else (heads,))}
    for name, module in model.named_modules():
        if id(module) in heads:
            parts = name.split(".")
            inner.update(".".join(parts[:i]) for i in range(1, len(parts)))
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        parts = name.split(".")[:-1]
        owners = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        for owner in owners:
            if _under(owner, frozen_modules):
                break
            inner.add(owner)
    return frozenset(inner)


def _acts_alike(module: nn.Module) -> bool:
    """A parameter-free module that computes the same in training and eval (no buffers, no live dropout)."""
    for m in module.modules():
        if any(True for _ in m.buffers(recurse=False)):
            return False
        rate = next((float(getattr(m, a)) for a in ("p", "prob", "drop_prob", "drop_rate")
                     if isinstance(getattr(m, a, None), (int, float)) and not isinstance(getattr(m, a), bool)), 0.0)
        if ("Drop" in type(m).__name__ or isinstance(m, nn.modules.dropout._DropoutNd)) and rate > 0:
            return False
    return not any(True for _ in module.parameters())


def _signature(node: fx.Node) -> tuple:
    return node.op, str(node.target), repr(node.args), repr(node.kwargs), node.name


def _classify(model: nn.Module, graph: fx.Graph, frozen_modules: tuple[str, ...],
              differs_from: int) -> tuple[list[fx.Node], list[str]]:
    """Each node's role: 'frozen' (uses a frozen parameter or module), 'same' (acts alike in training and
    eval, trains nothing), 'attr' (a constant read, copied to whichever side uses it) or why it must train."""
    nodes = list(graph.nodes)
    roles = []
    for i, n in enumerate(nodes):
        if i >= differs_from:
            roles.append(f"{n.name} (differs between training and eval)")
        elif n.op == "placeholder":  # the input, or an optional argument fixed at its default
            roles.append("same")
        elif n.op == "get_attr":
            value = model.get_parameter(n.target) if isinstance(_attr(model, n.target), nn.Parameter) else None
            roles.append("frozen" if value is not None and not value.requires_grad
                         else f"{n.target} (trains)" if value is not None else "attr")
        elif n.op == "call_module":
            module = model.get_submodule(n.target)
            if _under(n.target, frozen_modules):
                roles.append("frozen")
            elif _acts_alike(module):
                roles.append("same")
            else:
                roles.append(f"{n.target} ({type(module).__name__}, which trains or acts differently in training)")
        elif n.op in ("call_function", "call_method"):
            roles.append("same")
        else:  # output
            roles.append("output")
    return nodes, roles


def _attr(model: nn.Module, target: str) -> Any:
    obj: Any = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _live_after(nodes: list[fx.Node], i: int, roles: list[str]) -> set[fx.Node]:
    """Values made at or before ``i`` that a later node reads (constant reads left out: both sides copy them)."""
    later = set(nodes[i + 1:])
    return {n for k, n in enumerate(nodes[:i + 1]) if roles[k] != "attr" and any(u in later for u in n.users)}


def _find_cut(nodes_t: list[fx.Node], roles: list[str], nodes_e: list[fx.Node], roles_e: list[str]) -> tuple[int, str]:
    """The index of the last value that may end the prefix (-1 and why when none)."""
    last_frozen = max((i for i, r in enumerate(roles) if r == "frozen"), default=-1)
    if last_frozen < 0:
        return -1, "the traced forward pass uses no frozen parameter"
    blocking = next((r for r in roles[:last_frozen + 1] if r not in ("frozen", "same", "attr")), None)
    if blocking:
        return -1, f"{blocking} comes before the last frozen layer"
    best = -1
    for i in range(last_frozen, len(nodes_t)):
        if roles[i] not in ("frozen", "same", "attr"):
            break
        if roles[i] != "attr" and _live_after(nodes_t, i, roles) == {nodes_t[i]} and \
                _live_after(nodes_e, i, roles_e) == {nodes_e[i]}:
            best = i
    if best < 0:
        return -1, "no single value carries the frozen layers' output to the rest of the network"
    return best, ""


def _split(model: nn.Module, nodes: list[fx.Node], cut: int) -> tuple[fx.GraphModule, fx.GraphModule]:
    """(nodes[..cut] returning the cut's value, the rest reading it as its input), sharing ``model``'s modules."""
    head, env = fx.Graph(), {}
    for n in nodes[:cut + 1]:
        env[n] = head.node_copy(n, lambda a: env[a])
    head.output(env[nodes[cut]])
    tail = fx.Graph()
    rest = {nodes[cut]: tail.placeholder("features")}

    def arg(a: fx.Node) -> fx.Node:
        if a not in rest:  # a constant read before the cut: read it again here
            rest[a] = tail.node_copy(a, lambda b: rest[b])
        return rest[a]

    for n in nodes[cut + 1:]:
        rest[n] = tail.node_copy(n, arg)
    return fx.GraphModule(model, head), fx.GraphModule(model, tail)


def _trace(model: nn.Module, inner: frozenset[str]) -> fx.Graph:
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    if any(p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        raise TypeError("forward() takes inputs besides the image")
    concrete = {p.name: p.default for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return _Tracer(inner).trace(model, concrete_args=concrete or None)


def plan_prefix(model: nn.Module, n_groups: int, frozen_groups: tuple[int, ...], frozen_modules: tuple[str, ...],
                sample: torch.Tensor, autocast: Callable[[], Any], train_mode: Callable[[], None],
                ) -> tuple[PrefixPlan | None, str]:
    """A PrefixPlan when the trial's frozen layers form a prefix whose outputs can stand in for it, else None;
    the reason either way (recorded with the trial). ``sample`` (a few inputs on the model's device) checks
    the split against the whole model in its training state (``train_mode``), to 1e-5."""
    if not frozen_groups:
        return None, "nothing is frozen"
    if tuple(frozen_groups) != tuple(range(len(frozen_groups))):
        return None, f"frozen groups {list(frozen_groups)} are not a prefix of the network"
    was_training = model.training
    try:
        inner = _inner_modules(model, frozen_modules)
        train_mode()
        graph_t = _trace(model, inner)
        model.eval()
        graph_e = _trace(model, inner)
    except Exception as exc:  # fx raises TraceError, TypeError, NotImplementedError, ... on dynamic code
        return None, f"torch.fx cannot trace the model ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
    finally:
        model.train(was_training)
    nodes_t, nodes_e = list(graph_t.nodes), list(graph_e.nodes)
    differs = next((i for i, (a, b) in enumerate(zip(nodes_t, nodes_e)) if _signature(a) != _signature(b)),
                   min(len(nodes_t), len(nodes_e)))
    nodes_t, roles = _classify(model, graph_t, frozen_modules, differs)
    nodes_e, roles_e = _classify(model, graph_e, frozen_modules, differs)
    cut, why = _find_cut(nodes_t, roles, nodes_e, roles_e)
    if cut < 0:
        return None, why
    prefix, train_graph = _split(model, nodes_t, cut)
    _, eval_graph = _split(model, nodes_e, cut)
    suffix = _Suffix(train_graph, eval_graph, train_mode, model.eval)
    whole, split, feats = _check(model, prefix, suffix, sample, autocast, train_mode)
    if whole.shape != split.shape or not torch.allclose(whole, split, atol=_TOLERANCE, rtol=0):
        return None, f"the suffix on cached outputs of {nodes_t[cut].name} does not reproduce the model's output"
    plan = PrefixPlan(prefix, suffix, nodes_t[cut].name, feats.dtype, 4 * int(feats[0].numel()))
    if len(frozen_groups) == n_groups:
        return plan, LINEAR_PROBE_NOTE
    return plan, f"first {len(frozen_groups)} of {n_groups} layer groups on cached outputs of {plan.cut}"


def _check(model: nn.Module, prefix: nn.Module, suffix: nn.Module, sample: torch.Tensor,
           autocast: Callable[[], Any], train_mode: Callable[[], None]) -> tuple[torch.Tensor, ...]:
    """(the whole model's output, the suffix's on the prefix's, the prefix's) in the training state, from the
    same random state; the model's buffers (BatchNorm statistics), mode and random state are left as found."""
    was_training = model.training
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    rng = torch.get_rng_state()  # the check must not shift the random stream the trial then draws from
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def reset() -> None:
        for b, saved in buffers:
            b.copy_(saved)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)

    try:
        with torch.no_grad(), autocast():
            train_mode()
            whole = model(sample).float()
            reset()
            prefix.eval()
            feats = prefix(sample)
            suffix.train()
            split = suffix(feats.float().to(feats.dtype)).float()  # through float32 and back, as the cache does
    finally:
        with torch.no_grad():
            reset()
        model.train(was_training)
    return whole, split, feats


def compute_features(prefix: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], n: int,
                     device: torch.device, autocast: Callable[[], Any]) -> np.ndarray:
    """The prefix's outputs for ``n`` rows arriving as ``(x, pos)`` batches, in row order (float32)."""
    prefix.eval()
    out: np.ndarray | None = None
    started = time.monotonic()
    with torch.no_grad():
        for xb, pos in batches:
            with autocast():
                feats = prefix(xb.to(device, non_blocking=True)).float().cpu().numpy()
            if out is None:
                out = np.empty((n, *feats.shape[1:]), dtype=np.float32)
            out[pos.numpy()] = feats
    if out is None:
        raise ValueError(f"no rows arrived to compute features for ({n} expected, {time.monotonic() - started:.1f} s)")
    return out
