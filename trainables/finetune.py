"""The Tune trainable: one finetuning trial from axis values to metrics.

data -> intervention -> backbone (+ pretrained weights) -> freezing -> train -> evaluate -> report.
It checkpoints every epoch (model, optimiser, RNG) so a trial interrupted by a node failure or a
killed driver continues where it stopped. The last checkpoint also carries the test predictions and
the per-group table, which the driver-side tracker turns into MLflow artifacts: workers never write
MLflow (DESIGN decision 2).

``train_and_evaluate`` is the trial itself and runs without a Tune session (tests, notebooks);
``finetune_trial`` adapts it to Tune. Small datasets are finetuned from one on-device tensor; folder
datasets (``Dataset.in_memory`` false) stream batches decoded by DataLoader worker processes.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

__all__ = ["TrialContext", "finetune_trial", "train_and_evaluate", "PREDICTIONS_FILE", "PER_GROUP_FILE", "STATE_FILE"]

PREDICTIONS_FILE, PER_GROUP_FILE, STATE_FILE = "predictions.csv.gz", "per_group.csv", "state.pt"


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a sweep shares; built by the driver, with absolute paths only."""

    dataset: str
    dataset_options: Mapping[str, Any]
    finetune: Mapping[str, Any]  # size, epochs, batch_size, lr, weight_decay, momentum, threshold
    cache_root: str
    pretrained: Mapping[str, str] = field(default_factory=dict)  # "backbone|paradigm" -> cache key
    weight_files: Mapping[str, str] = field(default_factory=dict)  # "file:..." paradigm -> checkpoint path
    cpus_per_trial: float = 1.0
    # (point, objective metrics) of trials that already have a FINISHED MLflow run (finished after
    # Tune's last state save): on resume they report those metrics at once instead of training again.
    finished: tuple = ()
    # pretraining key -> error, for jobs that failed in this run: their trials fail at once with it
    failed_pretraining: Mapping[str, str] = field(default_factory=dict)


class PretrainingFailedError(RuntimeError):
    """The pretrained base this trial starts from could not be built; the message says why."""


def _pretrain_key(point: Mapping[str, Any], ctx: TrialContext) -> str | None:
    return ctx.pretrained.get(f"{point['backbone']}|{point['paradigm']}")


def _load_initial_weights(model: Any, point: Mapping[str, Any], ctx: TrialContext) -> str | None:
    from trainables import backbones
    from trainables.pretrain import PretrainCache

    paradigm = point["paradigm"]
    if paradigm in ctx.weight_files:
        backbones.load_backbone_state(model, backbones.load_weights_file(ctx.weight_files[paradigm]))
        return paradigm
    key = _pretrain_key(point, ctx)
    if key:
        backbones.load_backbone_state(model, PretrainCache(ctx.cache_root).load(key))
    return key


def train_and_evaluate(point: Mapping[str, Any], context: TrialContext, *, state: Mapping[str, Any] | None = None,
                       on_epoch: Callable[[dict[str, Any], Path], None] | None = None) -> dict[str, Any]:
    """One trial without Tune: finetune from ``point`` (the axis values), evaluate after the last epoch.

    ``state`` is a saved STATE_FILE (model, optimiser, RNG, epoch) to continue from. After every epoch
    ``on_epoch(result, folder)`` receives that epoch's result and a temporary folder holding STATE_FILE
    (plus PREDICTIONS_FILE and PER_GROUP_FILE after the last epoch), valid only during the call.
    Returns the last epoch's result: the metrics, the intervention's achieved value, freezing details.
    """
    import torch

    from trainables import backbones, interventions, loop, metrics
    from trainables.data import build_dataset

    loop.set_threads(context.cpus_per_trial)
    device = loop.select_device()
    ft = {**context.finetune, **(point.get("finetune") or {})}  # searched hyper-parameters (optuna) win
    seed = int(point["seed"])
    batch_size = int(ft["batch_size"])

    dataset = build_dataset(context.dataset, context.dataset_options)
    pool = dataset.meta("finetune")
    chosen = interventions.apply_intervention(point["intervention"], pool.labels, pool.groups,
                                              float(point["magnitude"]), int(ft["size"]), seed)
    y = torch.as_tensor(pool.labels[chosen.indices], dtype=torch.long, device=device)
    # Small data: the whole finetuning set on the device once. Folder data: streamed by worker processes.
    x = dataset.inputs("finetune", chosen.indices).to(device) if dataset.in_memory else None

    torch.manual_seed(seed)
    model = backbones.create_backbone(point["backbone"], num_classes=2, input_shape=dataset.input_shape)
    pretrain_ref = _load_initial_weights(model, point, context)
    groups = backbones.layer_groups(model)
    fd = point["freeze_depth"]
    frozen = backbones.resolve_freeze(tuple(fd) if isinstance(fd, list) else fd, groups.n, backbone=point["backbone"])
    info = backbones.apply_freeze(model, groups, frozen)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=ft["lr"], momentum=ft["momentum"], weight_decay=ft["weight_decay"])
    gen = torch.Generator().manual_seed(seed)

    start_epoch = 0
    if state is not None:  # resumed after a failure or a driver restart
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        if "torch_rng" in state:  # dropout draws from the global RNG; older checkpoints lack it
            torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"])
        start_epoch = int(state["epoch"])

    static = {"requested_magnitude": chosen.requested, "achieved_magnitude": chosen.achieved,
              "n_finetune": int(len(chosen.indices)), "n_groups": info.n_groups,
              "frozen_groups": json.dumps(list(info.frozen_groups)), "frozen_fraction": info.frozen_fraction,
              "pretrain_ref": pretrain_ref or "", "device": str(device)}
    train_mode = lambda: backbones.set_train_mode(model, info)  # noqa: E731 - frozen layers stay in eval
    epochs = int(ft["epochs"])
    result: dict[str, Any] = {}
    for epoch in range(start_epoch, epochs):
        if x is not None:
            loss = loop.train_epoch(model, x, y, opt, batch_size=batch_size, generator=gen, device=device,
                                    train_mode=train_mode)
        else:  # the order comes from (seed, epoch), so a resumed trial replays the same epoch
            stream = dataset.loader("finetune", chosen.indices, batch_size=batch_size, shuffle=True, seed=seed,
                                    epoch=epoch, drop_last=len(chosen.indices) > batch_size)
            loss = loop.train_epoch_batches(model, stream, y, opt, device=device, train_mode=train_mode)
        result = {**static, "epoch": epoch + 1, "train_loss": loss}
        with tempfile.TemporaryDirectory() as d:
            saved = {"model": model.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                     "torch_rng": torch.get_rng_state(), "epoch": epoch + 1}
            if device.type == "cuda":
                saved["cuda_rng"] = torch.cuda.get_rng_state()
            torch.save(saved, Path(d) / STATE_FILE)
            if epoch + 1 == epochs:
                result.update(_evaluate(model, dataset, ft, device, Path(d), metrics, loop))
            if on_epoch is not None:
                on_epoch(result, Path(d))
    return result


def finetune_trial(config: Mapping[str, Any], context: TrialContext) -> None:
    """Function trainable for ``tune.with_parameters(finetune_trial, context=...)``; the axis values
    arrive under ``config["point"]`` (one grid cell). A thin wrapper: Tune's checkpoint in, one report
    with a checkpoint per epoch out; the work is ``train_and_evaluate``."""
    import torch
    from ray import tune

    point = config["point"]
    for done_point, objectives in context.finished:
        if done_point == point:
            tune.report({"already_finished": True, **objectives})
            return
    key = _pretrain_key(point, context)
    if key in context.failed_pretraining:
        raise PretrainingFailedError(context.failed_pretraining[key])
    state = None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    from trainables import loop

    with loop.memory_hint(loop.select_device(), int(context.finetune["batch_size"])):
        train_and_evaluate(point, context, state=state,
                           on_epoch=lambda result, d: tune.report(result, checkpoint=tune.Checkpoint.from_directory(d)))


def _evaluate(model: Any, dataset: Any, ft: Mapping[str, Any], device: Any, out: Path, metrics: Any, loop: Any) -> dict:
    """Test-split metrics; predictions and the per-group table are written into ``out``."""
    import pandas as pd

    test = dataset.meta("test")
    batch_size = max(256, int(ft["batch_size"]))
    if dataset.in_memory:
        scores = loop.predict_scores(model, dataset.inputs("test").to(device), batch_size=batch_size, device=device)
    else:
        scores = loop.predict_scores_batches(model, dataset.loader("test", batch_size=batch_size), len(test),
                                             device=device)
    threshold = float(ft.get("threshold", 0.5))
    named = {attr: _group_labels(codes, dataset.group_names.get(attr)) for attr, codes in test.attributes.items()}
    ev = metrics.evaluate(test.labels, scores, named, primary=dataset.primary, threshold=threshold)
    frame = pd.DataFrame({"y_true": test.labels, "y_score": scores, "y_pred": (scores >= threshold).astype(int)})
    for attr, labels in named.items():
        frame["group" if attr == dataset.primary else f"group.{attr}"] = labels
    frame.to_csv(out / PREDICTIONS_FILE, index=False, compression="gzip")
    ev.per_group.to_csv(out / PER_GROUP_FILE, index=False)
    return {**{k: float(v) for k, v in ev.metrics.items()}, "done_training": True}


def _group_labels(codes: np.ndarray, names: Any) -> np.ndarray:
    """Group names where the dataset provides them, so tables read 'red'/'green' rather than 0/1."""
    return np.asarray(names, dtype=object)[codes] if names else codes
