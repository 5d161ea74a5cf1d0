"""The one supervised training loop, shared by pretraining and finetuning.

Model and data live on the device Ray assigned to the trial: CUDA when the trial was given a GPU
(Ray sets CUDA_VISIBLE_DEVICES), bf16 autocast where the GPU supports it and image weights and batches
in channels_last (``to_device``, ``on_device``), the CPU otherwise. ``resources.precision: fp32`` turns bf16
autocast and TF32 off (``PRECISIONS``): some models learn differently in bf16 (README, "GPUs").
Whole small datasets are moved to the device once and batched there, which is what keeps tiny
models from being bound by host-to-device copies. Folder datasets are too big for that: their batches
``(x, pos)`` stream from DataLoader workers (``Dataset.loader``) and are copied to the device one at a
time (``train_epoch_batches``, ``predict_scores_batches``); targets stay on the device, indexed by ``pos``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from trainables.errors import FairsweepError
from trainables.trial import PRECISIONS

__all__ = ["select_device", "to_device", "on_device", "autocast", "batches", "train_epoch", "train_epoch_batches",
           "predict_scores", "predict_scores_batches", "set_threads", "NonFiniteLossError", "TrialOutOfMemoryError",
           "memory_hint", "effective_precision", "set_precision", "process_precision"]

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class NonFiniteLossError(FairsweepError, FloatingPointError):
    """Training diverged; the trial fails with this message instead of logging NaN metrics."""


class TrialOutOfMemoryError(FairsweepError, MemoryError):
    """A trial ran out of GPU or host memory; the message says which knobs lower its footprint."""


def _is_out_of_memory(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(exc, (oom, MemoryError)) or (
        isinstance(exc, RuntimeError) and ("can't allocate memory" in str(exc) or "not enough memory" in str(exc)))


@contextlib.contextmanager
def memory_hint(device: torch.device, batch_size: int) -> Iterator[None]:
    """Turn an allocation failure (CUDA or host) into TrialOutOfMemoryError with what to change."""
    try:
        yield
    except TrialOutOfMemoryError:
        raise
    except BaseException as exc:
        if not _is_out_of_memory(exc):
            raise
        where = "GPU" if device.type == "cuda" else "host"
        raise TrialOutOfMemoryError(
            f"out of {where} memory on {device} with batch_size {batch_size}: {str(exc).splitlines()[0][:300]}; lower "
            f"finetune.batch_size (or pretraining.batch_size), run fewer trials at once (resources.max_concurrent_trials), "
            f"or give each trial a whole GPU (resources.gpus_per_trial: 1)") from exc


def select_device() -> torch.device:
    """CUDA when this process may see a GPU (Ray hides GPUs from trials that did not ask for one)."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def to_device(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` on ``device``; on CUDA with its 4-D weights in channels_last, the layout cuDNN's bf16
    convolutions run fastest in (``on_device`` gives image batches the same layout; 1-D models are unchanged)."""
    return model.to(device, memory_format=torch.channels_last) if device.type == "cuda" else model.to(device)


def on_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch on ``device``, image batches on CUDA in channels_last (as ``to_device`` lays out the weights)."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda and x.dim() == 4 else x


def process_precision() -> str:
    """What ``set_precision`` last set in this process, read from the torch flag it sets (fp32 turns cuDNN's TF32
    off; torch's default, bf16, leaves it on): what the training functions compute in when not told, so a
    plugin's trainer that does not pass ``precision`` still follows its sweep's ``resources.precision``."""
    return "bf16" if torch.backends.cudnn.allow_tf32 else "fp32"


def autocast(device: torch.device, precision: str | None = None) -> contextlib.AbstractContextManager:
    """bf16 autocast on a CUDA device that supports it, unless ``precision`` (default: ``process_precision``) is
    fp32; a no-op otherwise."""
    if effective_precision(device, precision) == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def effective_precision(device: torch.device, precision: str | None = None) -> str:
    """What ``autocast(device, precision)`` computes in: bf16 only on a CUDA device with bf16 support."""
    precision = process_precision() if precision is None else precision
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    return "bf16" if precision == "bf16" and device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def set_precision(precision: str) -> None:
    """fp32: TF32 off for matrix products and convolutions, so a GPU computes what the CPU does, to the
    rounding of reductions; bf16: torch's defaults (TF32 for convolutions only). Per process, like
    ``set_threads``; every trial and pretraining job sets it first."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = precision == "bf16"


def set_threads(cpus: float) -> None:
    """Use as many intra-op threads as CPUs Ray granted, so concurrent trials do not oversubscribe."""
    torch.set_num_threads(max(1, int(math.floor(cpus))))


def batches(n: int, batch_size: int, generator: torch.Generator | None, *, drop_last: bool = False) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    stop = n - (n % batch_size) if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]


def _step(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, optimizer: torch.optim.Optimizer,
          device: torch.device, loss_fn: Loss, seen: int, precision: str | None = None) -> float:
    """One optimiser step on a batch already on the device; returns its mean loss."""
    with autocast(device, precision):
        loss = loss_fn(model(on_device(xb, device)).float(), yb)
    if not torch.isfinite(loss):
        raise NonFiniteLossError(f"training loss became {loss.item()} after {seen} examples; lower the learning rate")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def train_epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer, *,
                batch_size: int, generator: torch.Generator, device: torch.device,
                loss_fn: Loss | None = None, train_mode: Callable[[], None] | None = None,
                precision: str | None = None) -> float:
    """One pass over (x, y) in shuffled mini-batches; returns the example-weighted mean loss."""
    loss_fn = loss_fn or nn.functional.cross_entropy
    (train_mode or model.train)()
    total, count = 0.0, 0
    for idx in batches(len(x), batch_size, generator, drop_last=len(x) > batch_size):
        idx = idx.to(x.device)
        total += _step(model, x[idx], y[idx], optimizer, device, loss_fn, count, precision) * len(idx)
        count += len(idx)
    return total / max(count, 1)


def train_epoch_batches(model: nn.Module, stream: Iterable[tuple[torch.Tensor, torch.Tensor]], targets: torch.Tensor,
                        optimizer: torch.optim.Optimizer, *, device: torch.device, loss_fn: Loss | None = None,
                        train_mode: Callable[[], None] | None = None, precision: str | None = None) -> float:
    """One pass over streamed batches ``(x, pos)`` (``Dataset.loader``); ``targets[pos]`` are their labels.

    The stream decides order and batch size (shuffle and drop the last partial batch there, as
    ``train_epoch`` does); returns the example-weighted mean loss.
    """
    loss_fn = loss_fn or nn.functional.cross_entropy
    (train_mode or model.train)()
    total, count = 0.0, 0
    for xb, pos in stream:
        xb = on_device(xb, device)
        yb = targets[pos.to(targets.device)]
        total += _step(model, xb, yb, optimizer, device, loss_fn, count, precision) * len(pos)
        count += len(pos)
    return total / max(count, 1)


@torch.no_grad()
def predict_scores(model: nn.Module, x: torch.Tensor, *, batch_size: int, device: torch.device,
                   precision: str | None = None) -> np.ndarray:
    """P(y = 1) for every row of x, in order (the model's two logits through a softmax)."""
    model.eval()
    out = []
    for start in range(0, len(x), batch_size):
        with autocast(device, precision):
            logits = model(on_device(x[start:start + batch_size], device)).float()
        out.append(torch.softmax(logits, dim=1)[:, 1].cpu())
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


@torch.no_grad()
def predict_scores_batches(model: nn.Module, stream: Iterable[tuple[torch.Tensor, torch.Tensor]], n: int, *,
                           device: torch.device, precision: str | None = None) -> np.ndarray:
    """P(y = 1) for ``n`` rows arriving as batches ``(x, pos)`` in any order; every row must arrive."""
    model.eval()
    out = np.full(n, np.nan)
    for xb, pos in stream:
        with autocast(device, precision):
            logits = model(on_device(xb, device)).float()
        out[pos.numpy()] = torch.softmax(logits, dim=1)[:, 1].cpu().numpy()
    missing = np.flatnonzero(np.isnan(out))
    if len(missing):
        raise RuntimeError(f"{len(missing)} of {n} rows never arrived from the data loader (e.g. {missing[:5].tolist()}); "
                           "it must yield every requested row")
    return out
