"""Self-supervised pretraining: two augmented views, a projection head and a loss from lightly.

lightly supplies the well-tested parts (NT-Xent, VICReg loss and heads); what is ours is the
augmentation per modality and the loop. Augmentations run batched on the trial's device.
Image augmentations never flip vertically: for the synthetic images the target *is* the square's
vertical position, and a vertical flip would invert the label the finetuning stage learns.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from trainables.registry import Registry

__all__ = ["SSLMethod", "SSL_METHODS", "embed", "augment", "train_ssl"]


def embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pooled representation before the classifier (timm's ``forward_head(pre_logits=True)``)."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def _augment_images(x: torch.Tensor) -> torch.Tensor:
    n, _, h, w = x.shape
    dev = x.device
    flip = torch.rand(n, device=dev) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    # random scale (0.8-1.0 crop) and translation (up to 1/8 of the side), one affine map per image
    scale = 0.8 + 0.2 * torch.rand(n, device=dev)
    shift = (torch.rand(n, 2, device=dev) - 0.5) * 0.25
    theta = torch.zeros(n, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 1, 1] = scale, scale
    theta[:, :, 2] = shift
    grid = nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    x = nn.functional.grid_sample(x, grid, padding_mode="reflection", align_corners=False)
    gain = 0.8 + 0.4 * torch.rand(n, 1, 1, 1, device=dev)
    bias = 0.1 * torch.randn(n, 1, 1, 1, device=dev)
    return x * gain + bias + 0.1 * torch.randn_like(x)


def _augment_timeseries(x: torch.Tensor) -> torch.Tensor:
    """Paper B's scaling and negation, plus jitter and a random time mask (x is (N, C, T))."""
    n, c, t = x.shape
    dev = x.device
    x = x * (0.8 + 0.4 * torch.rand(n, c, 1, device=dev))
    x = torch.where((torch.rand(n, 1, 1, device=dev) < 0.5), -x, x)
    x = x + 0.05 * torch.randn_like(x)
    width = max(1, t // 8)
    start = torch.randint(0, max(1, t - width), (n, 1), device=dev)
    pos = torch.arange(t, device=dev)[None, :]
    mask = (pos >= start) & (pos < start + width)
    return x.masked_fill(mask[:, None, :], 0.0)


_AUGMENT = {"image": _augment_images, "timeseries": _augment_timeseries}


def augment(x: torch.Tensor, modality: str) -> torch.Tensor:
    return _AUGMENT[modality](x)


@dataclass(frozen=True)
class SSLMethod:
    """A self-supervised objective: ``build(dim, options)`` -> (trainable head, loss(z1, z2))."""

    name: str
    defaults: Mapping[str, Any]
    build: Callable[[int, Mapping[str, Any]], tuple[nn.Module, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]]


SSL_METHODS: Registry[SSLMethod] = Registry("self-supervised method")


def _simclr(dim: int, opts: Mapping[str, Any]):
    from lightly.loss import NTXentLoss
    from lightly.models.modules.heads import SimCLRProjectionHead

    head = SimCLRProjectionHead(dim, max(dim, 64), int(opts["projection_dim"]))
    return head, NTXentLoss(temperature=float(opts["temperature"]))


def _vicreg(dim: int, opts: Mapping[str, Any]):
    from lightly.loss import VICRegLoss
    from lightly.models.modules.heads import VICRegProjectionHead

    width = int(opts["projection_dim"])
    head = VICRegProjectionHead(dim, width, width, num_layers=3)
    return head, VICRegLoss(lambda_param=float(opts["invariance"]), mu_param=float(opts["variance"]),
                            nu_param=float(opts["covariance"]))


SSL_METHODS.register("simclr")(SSLMethod("simclr", {"temperature": 0.1, "projection_dim": 64}, _simclr))
SSL_METHODS.register("vicreg")(SSLMethod("vicreg", {"projection_dim": 256, "invariance": 25.0, "variance": 25.0,
                                                     "covariance": 1.0}, _vicreg))


def train_ssl(model: nn.Module, x: torch.Tensor, *, method: str, options: Mapping[str, Any], modality: str,
              hparams: Mapping[str, Any], device: torch.device, generator: torch.Generator) -> list[float]:
    """Pretrain ``model``'s representation on unlabeled ``x``; returns the mean loss of each epoch."""
    from trainables import loop

    spec = SSL_METHODS.get(method)
    opts = {**spec.defaults, **options}
    with torch.no_grad():
        model.eval()
        dim = embed(model, x[:2]).shape[1]
    head, loss_fn = spec.build(dim, opts)
    head.to(device)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=hparams["lr"], momentum=hparams["momentum"], weight_decay=hparams["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=hparams["epochs"])
    losses = []
    for _ in range(hparams["epochs"]):
        model.train()
        head.train()
        total, count = 0.0, 0
        for idx in loop.batches(len(x), hparams["batch_size"], generator, drop_last=True):
            xb = x[idx.to(x.device)]
            with loop.autocast(device):
                z1 = head(embed(model, augment(xb, modality)))
                z2 = head(embed(model, augment(xb, modality)))
                loss = loss_fn(z1.float(), z2.float())
            if not math.isfinite(loss.item()):
                raise loop.NonFiniteLossError(f"{method} loss became {loss.item()}; lower pretraining.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            count += len(idx)
        sched.step()
        losses.append(total / max(count, 1))
    return losses
