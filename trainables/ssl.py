"""Self-supervised pretraining objectives: SimCLR, VICReg, BYOL (two augmented views) and MAE (masked
reconstruction on ViT patch tokens).

lightly supplies the well-tested parts (NT-Xent, VICReg and negative-cosine losses, projection and
prediction heads, the masked ViT encoder and decoder, token masking); what is ours is the augmentation
per modality and the loop. Augmentations run batched on the trial's device. Image augmentations never
flip vertically: for the synthetic images the target *is* the square's vertical position, and a
vertical flip would invert the label the finetuning stage learns.

SimCLR follows paper B's public code (Nokia-Bell-Labs/SSLfairness, ``code/baselines/SimCLR``): its
projection head is ``simclr_models.attach_simclr_head`` (Dense 256 -> ReLU -> Dense 128 -> ReLU -> Dense
50, no batch norm; Keras' glorot-uniform kernels and zero biases), its temperature ``train_model.py``'s
0.1, its time-series views ``train_model.py``'s ``[scaling_transform_vectorized,
negate_transform_vectorized]`` (``TimeseriesViews``). NT-Xent is lightly's, with the same negatives as
paper B's ``NT_Xent_loss`` (both views of every other example); paper B sums its two directions where
lightly averages them, a factor of 2 that ``pretraining.lr`` absorbs. Paper B's loop takes gradients of
NT-Xent alone, so the backbone's L2 penalties (``backbones.param_groups``) are not applied here.

Each method builds an ``Objective``: the trainable modules it adds beside the backbone and the loss of
one batch. Option values arrive resolved and validated by the paradigm that names the method
(``trainables.paradigms``), so this module holds no defaults of its own.

lightly and timm are imported inside the functions of the objectives that use them: each takes seconds to
load (lightly brings torchvision), and the plan imports this module to check that a method can serve a backbone.
"""
from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from trainables import loop
from trainables.paradigms import ParadigmError
from trainables.registry import Registry

__all__ = ["Objective", "SSLMethod", "SSL_METHODS", "TIMESERIES_AUGMENTATIONS", "TimeseriesViews", "embed",
           "simclr_head", "augmenter", "parse_augmentations", "time_warp", "train_ssl", "is_timm_vit"]


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


def time_warp(x: torch.Tensor, strength: float = 0.2, knots: int = 4) -> torch.Tensor:
    """Resample each series (N, C, T) along a smooth, monotone random warp of its time axis: the local
    speed varies within 1 ± ``strength`` between ``knots`` points; the first and last steps stay put."""
    n, c, t = x.shape
    if t < 2 or strength == 0:
        return x
    speed = 1 + strength * (2 * torch.rand(n, 1, knots, device=x.device) - 1)
    speed = nn.functional.interpolate(speed, size=t, mode="linear", align_corners=True)[:, 0]
    pos = torch.cumsum(speed, dim=1) - speed[:, :1]
    pos = pos / pos[:, -1:] * (t - 1)  # monotone, from 0 to t - 1
    lo = pos.floor().long().clamp(0, t - 2)
    w = (pos - lo)[:, None, :].to(x.dtype)
    left = x.gather(2, lo[:, None, :].expand(n, c, t))
    right = x.gather(2, (lo + 1)[:, None, :].expand(n, c, t))
    return left * (1 - w) + right * w


def _scale(x: torch.Tensor, views: "TimeseriesViews") -> torch.Tensor:
    """Paper B's ``scaling_transform_vectorized``: each channel of each series times a factor ~ N(1, sigma)."""
    n, c, _ = x.shape
    return x * (1 + views.scale_sigma * torch.randn(n, c, 1, device=x.device, dtype=x.dtype))


def _negate(x: torch.Tensor, views: "TimeseriesViews") -> torch.Tensor:
    """Paper B's ``negate_transform_vectorized`` (x * -1) applied to each series with probability negate_p."""
    flip = torch.rand(x.shape[0], 1, 1, device=x.device) < views.negate_p
    return torch.where(flip, -x, x)


def _jitter(x: torch.Tensor, views: "TimeseriesViews") -> torch.Tensor:
    """Paper B's ``noise_transform_vectorized``: additive N(0, 0.05) noise."""
    return x + 0.05 * torch.randn_like(x)


def _mask(x: torch.Tensor, views: "TimeseriesViews") -> torch.Tensor:
    """A random window of an eighth of the series set to zero (not among paper B's transformations)."""
    n, _, t = x.shape
    width = max(1, t // 8)
    start = torch.randint(0, max(1, t - width), (n, 1), device=x.device)
    pos = torch.arange(t, device=x.device)[None, :]
    return x.masked_fill(((pos >= start) & (pos < start + width))[:, None, :], 0.0)


_TIMESERIES: Mapping[str, Callable[[torch.Tensor, "TimeseriesViews"], torch.Tensor]] = {
    "scale": _scale, "negate": _negate,
    "time_warp": lambda x, views: time_warp(x),  # paper B's time_warp_transform_low_cost: sigma 0.2, 4 knots
    "jitter": _jitter, "mask": _mask}
TIMESERIES_AUGMENTATIONS = tuple(_TIMESERIES)


def parse_augmentations(text: str, *, where: str = "augmentations") -> tuple[str, ...]:
    """``"scale,negate"`` -> ("scale", "negate"); ParadigmError naming the unknown ones and what exists."""
    names = tuple(part.strip() for part in str(text).split(","))
    unknown = [n for n in names if n not in _TIMESERIES]
    if unknown or not names:
        raise ParadigmError(f"{where}: got {text!r}; expected a comma-separated list of {', '.join(_TIMESERIES)} "
                         "(applied in that order), e.g. 'scale,negate' (paper B's)")
    return names


@dataclass(frozen=True)
class TimeseriesViews:
    """The random transformation that makes one view of a batch of series (N, C, T): ``names`` in order,
    each drawn independently per view (paper B composes scaling then negation)."""

    names: tuple[str, ...]
    scale_sigma: float
    negate_p: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.names:
            x = _TIMESERIES[name](x, self)
        return x


def augmenter(modality: str, options: Mapping[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The view-making function of a method: images get the fixed crop/flip/colour set; time series
    the paradigm's ``augmentations`` (with ``scale_sigma`` and ``negate_p``)."""
    if modality == "image":
        return _augment_images
    return TimeseriesViews(parse_augmentations(options["augmentations"]), float(options["scale_sigma"]),
                           float(options["negate_p"]))


# ------------------------------------------------------------------------------------ objectives


class Objective(nn.Module):
    """The modules a method trains beside the backbone, and the loss of one batch of raw inputs; ``views``
    makes one augmented view of a batch (``augmenter``)."""

    def __init__(self, modality: str, options: Mapping[str, Any]):
        super().__init__()
        self.modality = modality
        self.views = augmenter(modality, options)

    def loss(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        """Called after every optimiser step (momentum targets update here)."""


class _TwoViews(Objective):
    """SimCLR / VICReg: one projection head, a symmetric loss between two augmented views."""

    def __init__(self, modality: str, opts: Mapping[str, Any], head: nn.Module,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        super().__init__(modality, opts)
        self.head, self.loss_fn = head, loss_fn

    def loss(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        z1 = self.head(embed(model, self.views(x)))
        z2 = self.head(embed(model, self.views(x)))
        return self.loss_fn(z1.float(), z2.float())


def _keras_dense(n_in: int, n_out: int) -> nn.Linear:
    """A Keras ``Dense`` as torch builds it: glorot-uniform kernel, zero bias (Keras' defaults)."""
    layer = nn.Linear(n_in, n_out)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def simclr_head(dim: int, hidden: int, hidden_2: int, out: int) -> nn.Sequential:
    """Paper B's projection head (``simclr_models.attach_simclr_head(hidden_1=256, hidden_2=128, hidden_3=50)``):
    Dense -> ReLU -> Dense -> ReLU -> Dense, no batch norm."""
    return nn.Sequential(_keras_dense(dim, hidden), nn.ReLU(), _keras_dense(hidden, hidden_2), nn.ReLU(),
                         _keras_dense(hidden_2, out))


def _simclr(model: nn.Module, dim: int, opts: Mapping[str, Any], modality: str) -> Objective:
    from lightly.loss import NTXentLoss

    head = simclr_head(dim, int(opts["hidden_dim"]), int(opts["hidden_dim_2"]), int(opts["projection_dim"]))
    return _TwoViews(modality, opts, head, NTXentLoss(temperature=float(opts["temperature"])))


def _vicreg(model: nn.Module, dim: int, opts: Mapping[str, Any], modality: str) -> Objective:
    from lightly.loss import VICRegLoss
    from lightly.models.modules.heads import VICRegProjectionHead

    width = int(opts["projection_dim"])
    head = VICRegProjectionHead(dim, width, width, num_layers=3)
    return _TwoViews(modality, opts, head, VICRegLoss(lambda_param=float(opts["invariance"]), mu_param=float(opts["variance"]),
                                                nu_param=float(opts["covariance"])))


class _BYOL(Objective):
    """Online backbone + projection + predictor chase a momentum (EMA) copy of backbone + projection."""

    def __init__(self, model: nn.Module, dim: int, opts: Mapping[str, Any], modality: str):
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules.heads import BYOLPredictionHead, BYOLProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        super().__init__(modality, opts)
        hidden, out = int(opts["hidden_dim"]), int(opts["projection_dim"])
        self.projection = BYOLProjectionHead(dim, hidden, out)
        self.prediction = BYOLPredictionHead(out, hidden, out)
        self.target_backbone = copy.deepcopy(model)
        self.target_projection = copy.deepcopy(self.projection)
        deactivate_requires_grad(self.target_backbone)
        deactivate_requires_grad(self.target_projection)
        self.ema = float(opts["ema"])
        self.criterion = NegativeCosineSimilarity()

    def loss(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        v1, v2 = self.views(x), self.views(x)
        p1 = self.prediction(self.projection(embed(model, v1)))
        p2 = self.prediction(self.projection(embed(model, v2)))
        with torch.no_grad():
            t1 = self.target_projection(embed(self.target_backbone, v1))
            t2 = self.target_projection(embed(self.target_backbone, v2))
        return 0.5 * (self.criterion(p1.float(), t2.float()) + self.criterion(p2.float(), t1.float()))

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        from lightly.models.utils import update_momentum

        update_momentum(model, self.target_backbone, self.ema)
        update_momentum(self.projection, self.target_projection, self.ema)


def _byol(model: nn.Module, dim: int, opts: Mapping[str, Any], modality: str) -> Objective:
    return _BYOL(model, dim, opts, modality)


def is_timm_vit(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def _mae_serves(model: nn.Module, input_shape: tuple[int, ...]) -> str | None:
    if not is_timm_vit(model):
        return (f"masked reconstruction works on ViT patch tokens; {type(model).__name__} is not a timm "
                "VisionTransformer (use a ViT backbone such as test_vit or vit_small_patch16_224, or an SSL "
                "paradigm that serves any backbone: simclr, vicreg, byol)")
    ph, pw = model.patch_embed.patch_size
    if len(input_shape) != 3 or input_shape[1] != input_shape[2] or ph != pw or input_shape[1] % ph:
        return (f"masked reconstruction needs square images tiled by square patches; got input {tuple(input_shape)} "
                f"and patches {ph}x{pw}")
    if (input_shape[1] // ph) ** 2 < 2:
        return f"masked reconstruction needs at least 2 patches; {tuple(input_shape)} images make 1 of {ph}x{pw}"
    return None


class _MAE(Objective):
    """Mask most patch tokens, encode the rest with the backbone's own blocks, predict the masked pixels."""

    def __init__(self, model: nn.Module, opts: Mapping[str, Any], modality: str):
        from lightly.models.modules import MaskedVisionTransformerDecoderTIMM, MaskedVisionTransformerTIMM

        super().__init__(modality, opts)
        # The wrapper re-initialises the ViT MAE-style (xavier, sin-cos pos_embed) and reuses its modules,
        # so training the encoder trains ``model`` itself.
        self.encoder = MaskedVisionTransformerTIMM(vit=model)
        width, n_patches = int(opts["decoder_dim"]), model.patch_embed.num_patches
        self.patch = int(model.patch_embed.patch_size[0])
        self.prefix = int(model.num_prefix_tokens)
        self.mask_ratio = float(opts["mask_ratio"])
        self.norm_pix = bool(opts["norm_pix_loss"])
        self.to_decoder = nn.Linear(model.embed_dim, width)
        self.decoder = MaskedVisionTransformerDecoderTIMM(num_patches=n_patches, embed_dim=width,
                                                          depth=int(opts["decoder_depth"]),
                                                          num_heads=int(opts["decoder_heads"]),
                                                          num_prefix_tokens=self.prefix)
        in_chans = model.patch_embed.proj.in_channels
        self.predict = nn.Linear(width, self.patch ** 2 * in_chans)

    def _mask(self, n: int, patches: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Token indices to keep (every prefix token plus a random share of patches) and to reconstruct."""
        keep = min(patches - 1, max(1, int(round(patches * (1.0 - self.mask_ratio)))))
        order = torch.rand(n, patches, device=device).argsort(dim=1) + self.prefix
        prefix = torch.arange(self.prefix, device=device).expand(n, -1)
        return torch.cat([prefix, order[:, :keep]], dim=1), order[:, keep:]

    def loss(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        from lightly.models import utils

        encoder = self.encoder
        x = self.views(x)
        n = x.shape[0]
        idx_keep, idx_mask = self._mask(n, encoder.sequence_length - self.prefix, x.device)
        tokens = self.to_decoder(encoder.encode(x, idx_keep=idx_keep))
        full = torch.zeros(n, encoder.sequence_length, tokens.shape[-1], device=x.device, dtype=tokens.dtype)
        full = utils.set_at_index(full, idx_keep, tokens)
        decoded = self.decoder(full, idx_mask=idx_mask)
        pred = self.predict(utils.get_at_index(decoded, idx_mask)).float()
        target = utils.get_at_index(utils.patchify(x, self.patch), idx_mask - self.prefix).float()
        if self.norm_pix:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        return nn.functional.mse_loss(pred, target)


def _mae(model: nn.Module, dim: int, opts: Mapping[str, Any], modality: str) -> Objective:
    return _MAE(model, opts, modality)


def _any_backbone(model: nn.Module, input_shape: tuple[int, ...]) -> str | None:
    if not hasattr(model, "forward_head") or not hasattr(model, "forward_features"):
        return ("it needs a backbone with forward_features/forward_head (pooled features before the "
                f"classifier); {type(model).__name__} has none")
    return None


@dataclass(frozen=True)
class SSLMethod:
    """A self-supervised objective. ``build(model, dim, options, modality)`` makes its ``Objective``;
    ``serves(model, input_shape)`` says why the method cannot train that backbone (None when it can)."""

    name: str
    build: Callable[[nn.Module, int, Mapping[str, Any], str], Objective]
    serves: Callable[[nn.Module, tuple[int, ...]], str | None] = _any_backbone
    modalities: tuple[str, ...] = ("image", "timeseries")


SSL_METHODS: Registry[SSLMethod] = Registry("self-supervised method")
for _m in (SSLMethod("simclr", _simclr), SSLMethod("vicreg", _vicreg), SSLMethod("byol", _byol),
           SSLMethod("mae", _mae, serves=_mae_serves, modalities=("image",))):
    SSL_METHODS.register(_m.name)(_m)


def train_ssl(model: nn.Module, data: torch.Tensor | Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]], *,
              method: str, options: Mapping[str, Any], modality: str, hparams: Mapping[str, Any], device: torch.device,
              generator: torch.Generator, precision: str | None = None) -> list[float]:
    """Pretrain ``model``'s representation on unlabeled inputs; returns the mean loss of each epoch.

    ``data`` is either every input already on ``device`` (small data, batched there) or a function
    of the epoch returning streamed batches ``(x, pos)`` (``Dataset.loader``: folder data decoded by
    worker processes), copied to the device one at a time.
    """
    started: dict[int, Iterator[torch.Tensor]] = {}  # epochs whose stream is already open
    if isinstance(data, torch.Tensor):
        x = data

        def epoch_batches(epoch: int) -> Iterator[torch.Tensor]:
            for idx in loop.batches(len(x), hparams["batch_size"], generator, drop_last=True):
                yield x[idx.to(x.device)]

        probe = x[:2]
    else:
        def epoch_batches(epoch: int) -> Iterator[torch.Tensor]:
            for xb, _ in data(epoch):
                yield xb.to(device, non_blocking=True)

        # the first batch of epoch 0 doubles as the probe; that epoch then goes on with the same stream
        first_epoch = epoch_batches(0)
        first = next(first_epoch)
        started[0] = itertools.chain([first], first_epoch)
        probe = first[:2]
    spec = SSL_METHODS.get(method)
    reason = spec.serves(model, tuple(probe.shape[1:]))
    if reason:
        raise ValueError(f"{method} cannot train {type(model).__name__}: {reason}")
    loop.to_device(model, device)  # in place; channels_last on CUDA
    with torch.no_grad():
        model.eval()
        dim = embed(model, probe).shape[1]
    objective = spec.build(model, dim, options, modality).to(device)
    params = list({id(p): p for p in [*model.parameters(), *objective.parameters()] if p.requires_grad}.values())
    opt = torch.optim.SGD(params, lr=hparams["lr"], momentum=hparams["momentum"], weight_decay=hparams["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=hparams["epochs"])
    losses = []
    for epoch in range(hparams["epochs"]):
        model.train()
        objective.train()
        total, count = 0.0, 0
        for xb in started.pop(epoch) if epoch in started else epoch_batches(epoch):
            if len(xb) < 2:  # contrastive and batch-statistics losses need two examples
                continue
            with loop.autocast(device, precision):
                loss = objective.loss(model, xb)
            if not math.isfinite(loss.item()):
                raise loop.NonFiniteLossError(f"{method} loss became {loss.item()}; lower pretraining.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            objective.after_step(model)
            total += loss.item() * len(xb)
            count += len(xb)
        sched.step()
        losses.append(total / max(count, 1))
    return losses
