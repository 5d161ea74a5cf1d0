"""The Tune trainable: one finetuning trial from axis values to metrics.

data -> intervention -> backbone (+ pretrained weights) -> freezing -> train -> evaluate -> report.
It checkpoints every epoch (model, optimiser, RNG) so a trial interrupted by a node failure or a
killed driver continues where it stopped. The last checkpoint also carries the test predictions and
the per-group table, which the driver-side tracker turns into MLflow artifacts: workers never write
MLflow (docs/architecture.md, decision 2).

``train_and_evaluate`` is the trial itself and runs without a Tune session (tests, notebooks);
``finetune_trial`` adapts it to Tune. Small datasets are finetuned from one on-device tensor; folder
datasets (``Dataset.in_memory`` false) stream batches decoded by DataLoader worker processes.

torch, Ray Tune and the modules that import torch (``trainables.loop``, ``trainables.feature_cache``,
``trainables.data``) are imported inside functions: ``orchestrator.launch`` imports this module on the driver,
which imports without torch, and ``train_and_evaluate`` runs without Ray.
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd

from trainables import backbones, interventions, metrics, pretrain, worker_cache
from trainables.pretrain import PretrainingFailedError
from trainables.trial import TrialConfig, Weights

__all__ = ["TrialContext", "finetune_trial", "train_and_evaluate", "PREDICTIONS_FILE", "PER_GROUP_FILE", "STATE_FILE",
           "INNER_SEARCH_FILE", "VAL_PREDICTIONS_FILE", "HEADLINE_METRICS", "PRETRAIN_OUTCOME", "PretrainingFailedError"]

PREDICTIONS_FILE, PER_GROUP_FILE, STATE_FILE = "predictions.csv.gz", "per_group.csv", "state.pt"
INNER_SEARCH_FILE = "inner_search.csv"  # the inner search's candidates and their validation losses
VAL_PREDICTIONS_FILE = "val_predictions.csv.gz"
# a trial's reports carry how its base was built (``PretrainOutcome`` as JSON), so the driver logs each pretraining run
PRETRAIN_OUTCOME = "pretrain_outcome"
# Test metrics that get bootstrap intervals besides the sweep's two objectives.
HEADLINE_METRICS = ("accuracy", "balanced_accuracy", "auroc", "worst_group_accuracy", "equalized_odds_difference",
                    "tpr_difference", "statistical_parity_difference")


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a sweep shares; built by the driver, with absolute paths only. What differs
    between trials is each one's ``TrialConfig`` (trainables/trial.py)."""

    dataset: str
    dataset_options: Mapping[str, Any]
    cache_root: str  # the pretraining cache, where a trial's Weights.key is read from
    cpus_per_trial: float = 1.0
    # (trial, objective metrics) of trials that already have a FINISHED MLflow run (finished after
    # Tune's last state save): on resume they report those metrics at once instead of training again.
    finished: tuple[tuple[TrialConfig, Mapping[str, float]], ...] = ()
    # pretraining key -> its PretrainJob as a dict: the first trial that needs a base builds it (the others of that
    # base wait for it on the key's lock); a key missing here is read from the cache as built before
    pretrain_jobs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # this driver's run of the sweep: a base that failed to build in it fails its later trials at once with that
    # error; the next run (a resume) builds it again
    driver_run: str = ""
    objectives: tuple[str, ...] = ()  # the sweep's (performance, fairness) metrics: they get bootstrap intervals
    bootstrap: int = 500  # resamples for the per-trial intervals (evaluation.bootstrap); 0 turns them off
    privileged: Mapping[str, Any] = field(default_factory=dict)  # dataset.privileged of the spec
    feature_cache: str | None = None  # folder of the frozen-prefix feature cache shared by a node's workers; None: off
    input_cache: str | None = None  # folder where folder images are decoded once for a node's workers; None: off
    # the two caches' budgets in bytes (resources.feature_cache_gb, input_cache_gb); None: the modules' defaults
    feature_cache_bytes: int | None = None
    input_cache_bytes: int | None = None
    checkpoint_interval_s: float = 0.0  # resources.checkpoint_interval_s: at most one checkpoint this often, and the last
    precision: str = "bf16"  # resources.precision: bf16 autocast on a GPU that supports it, or fp32 (loop.autocast)


def _load_initial_weights(model: Any, weights: Weights, cache_root: str) -> tuple[str | None, str | None]:
    """Load the trial's starting weights into ``model``; returns their key (None: random initialisation) and
    what identifies the very weights loaded, for the feature cache: a pretraining cache entry by its key and
    checksum (a base rebuilt under the same key has other weights), a file by its key (its content hash)."""
    if weights.file is not None:
        backbones.load_backbone_state(model, backbones.load_weights_file(weights.file))
        return weights.key, weights.key
    if weights.key is not None:  # read once per worker process: later trials on the same base reuse it
        state, digest = worker_cache.pretrained_weights(cache_root, weights.key)
        backbones.load_backbone_state(model, state)
        return weights.key, f"{weights.key}@sha256:{digest[:16]}"
    return None, None


def _candidates(value: Any) -> list[float]:
    """A finetuning rate as the inner search's candidate list (a scalar is a list of one)."""
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)]


def _val_loss(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy of the two-class softmax, from P(y = 1) (what ``predict_scores`` returns)."""
    p = np.where(labels == 1, scores, 1.0 - scores)
    return float(-np.mean(np.log(np.clip(p, 1e-12, 1.0))))


def train_and_evaluate(trial: TrialConfig, context: TrialContext, *, state: Mapping[str, Any] | None = None,
                       on_epoch: Callable[[dict[str, Any], Path], None] | None = None,
                       checkpoint_interval_s: float = 0.0) -> dict[str, Any]:
    """One trial without Tune: finetune as ``trial`` says, choose on validation, score both splits.

    The inner search (paper A; README, "Choosing on validation"): every (lr, weight_decay) candidate trains for the
    configured epochs; each reports ``val_loss`` per epoch; the epoch kept is the last or the one with
    the lowest validation loss (``select_epoch``), and the candidate kept is the one whose kept epoch
    has the lowest validation loss (ties: the first). A scalar lr and weight decay are one candidate.

    ``state`` is a saved STATE_FILE to continue from. After every epoch ``on_epoch(result, folder)``
    receives that epoch's result and a temporary folder, valid only during the call, holding STATE_FILE
    when a checkpoint is due (at most every ``checkpoint_interval_s`` seconds, 0 = every epoch, and always
    after the last epoch, with the predictions, per-group and inner-search files). Steps count
    epochs across candidates, so an inner search of 2 candidates x 3 epochs reports steps 1..6.
    Returns the last result: validation and test metrics at the chosen threshold, and the choices.
    """
    import torch

    from trainables import loop
    from trainables.data.base import batch_order

    loop.set_threads(context.cpus_per_trial)
    loop.set_precision(context.precision)
    device = loop.select_device()
    precision = context.precision
    computed = loop.effective_precision(device, precision)  # what autocast gives: bf16 only on a GPU that has it
    point, ft = trial.point, trial.finetune
    seed = point.seed
    batch_size = int(ft["batch_size"])
    epochs = int(ft["epochs"])
    select_epoch = str(ft.get("select_epoch", "last"))
    candidates = [(lr, wd) for lr in _candidates(ft["lr"]) for wd in _candidates(ft["weight_decay"])]

    dataset = worker_cache.dataset(context.dataset, context.dataset_options)
    dataset = pretrain.model_view(dataset, point.backbone)  # folder images: the backbone's own mean/std/crop
    # folder images: decoded once, then read from memory
    dataset = dataset.with_input_cache(context.input_cache, context.input_cache_bytes)
    pool = dataset.meta("finetune")
    chosen = interventions.apply_intervention(point.intervention, pool.labels, pool.groups, point.magnitude,
                                              point.finetune_size, seed)
    y = torch.as_tensor(pool.labels[chosen.indices], dtype=torch.long, device=device)
    # Small data: the whole finetuning set on the device once. Folder data: streamed by worker processes.
    # (the whole pool is rendered once per worker process; each trial indexes its own examples out of it)
    x = (worker_cache.split_inputs(dataset, "finetune")[torch.from_numpy(np.asarray(chosen.indices))].to(device)
         if dataset.in_memory else None)
    val_labels = dataset.meta("val").labels
    val_x = worker_cache.split_inputs(dataset, "val").to(device) if dataset.in_memory else None
    score_batch = max(256, batch_size)
    # With the feature cache on, a trial whose frozen layers form a prefix trains only the rest of the network, on
    # the prefix's outputs, computed once per content key and shared across trials (trainables/feature_cache.py).
    features: dict[str, np.ndarray] = {}
    feature_note = "off (resources.feature_cache: false)" if not context.feature_cache else ""
    plan: Any = None  # this candidate's PrefixPlan while the trial runs on cached features

    def feature_batches(split: str, rows: np.ndarray | None = None, order: list[np.ndarray] | None = None) -> Any:
        """Batches ``(x, pos)`` of cached features (``rows`` of ``split``, in ``order`` or in row order), read
        from the memory-mapped cache one batch at a time, in the dtype the prefix gave them."""
        feats = features[split]
        rows = np.arange(len(feats)) if rows is None else np.asarray(rows)
        if order is None:
            order = [np.arange(s, min(s + score_batch, len(rows))) for s in range(0, len(rows), score_batch)]
        for b in order:
            yield torch.from_numpy(np.asarray(feats[rows[b]])).to(plan.dtype), torch.from_numpy(b)

    feature_x: dict[str, Any] = {}  # small data: a split's cached features on the device, read once per trial

    def scores(net: Any, split: str) -> np.ndarray:
        """P(y = 1) for every example of ``split``: from cached features, in-memory inputs, or a stream."""
        if plan is not None and dataset.in_memory:  # on the device once, as small data's inputs are
            if split not in feature_x:
                feature_x[split] = torch.from_numpy(np.array(features[split])).to(device, plan.dtype)
            return loop.predict_scores(net, feature_x[split], batch_size=score_batch, device=device,
                                       precision=precision)
        if plan is not None:
            return loop.predict_scores_batches(net, feature_batches(split), len(features[split]), device=device,
                                               precision=precision)
        if split == "val" and val_x is not None:
            return loop.predict_scores(net, val_x, batch_size=score_batch, device=device, precision=precision)
        return _split_scores(net, dataset, split, score_batch, device, precision, loop)

    def use_features(model: Any, info: Any, loaded: str | None) -> tuple[Any, str]:
        """This candidate's PrefixPlan when the cache can serve the trial (``features`` filled on first use),
        else None; and why or why not."""
        from trainables import feature_cache as fc

        sample = (x[:8] if x is not None else next(iter(dataset.loader("finetune", chosen.indices[:8],
                                                                        batch_size=8)))[0].to(device))
        found, why = fc.plan_prefix(model, info.n_groups, info.frozen_groups, info.frozen_modules, sample,
                                    lambda: loop.autocast(device, precision),
                                    lambda: backbones.set_train_mode(model, info))
        if found is None or features:
            return found, why if found else f"off ({why})"
        cache = fc.FeatureCache(context.feature_cache, context.feature_cache_bytes)
        rows = {split: len(dataset.meta(split)) for split in ("finetune", "val", "test")}
        need = found.bytes_per_example * sum(rows.values())
        if not cache.fits(need):
            return None, (f"off (the outputs of {found.cut} take {need / 2**20:.0f} MiB, more than the feature "
                          f"cache's budget of {cache.budget_bytes / 2**20:.0f} MiB)")
        weights = loaded or f"random-init-seed-{seed}"  # random initialisation depends on the seed
        # on a GPU the key names the precision (entries made before resources.precision existed were bf16 and named
        # none); CPU keys, always fp32, stay as they were
        named = {"precision": computed} if device.type == "cuda" else {}
        for split, n in rows.items():
            key = fc.feature_key(dataset=dataset.fingerprint(), split=split, backbone=point.backbone,
                                 weights=weights, frozen=list(info.frozen_groups), cut=found.cut, device=device.type,
                                 **named)
            features[split] = cache.get_or_compute(key, lambda: fc.compute_features(
                found.prefix, iter(dataset.loader(split, batch_size=score_batch)), n, device,
                lambda: loop.autocast(device, precision)))
        return found, why

    def build(lr: float, wd: float) -> tuple[Any, Any, Any, Any]:
        torch.manual_seed(seed)
        model = backbones.create_backbone(point.backbone, num_classes=2, input_shape=dataset.input_shape)
        refs = _load_initial_weights(model, trial.weights, context.cache_root)
        info = backbones.apply_freeze(model, backbones.layer_groups(model), point.freeze_depth, backbone=point.backbone)
        model = loop.to_device(model, device)  # channels_last on CUDA
        # the trainable parameters; a backbone's own L2 penalties (cnn1d_paperb: paper B's) add to the decay
        opt = torch.optim.SGD(backbones.param_groups(model, wd), lr=lr, momentum=ft["momentum"])
        return model, opt, info, refs

    def snapshot(model: Any) -> dict:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    # Progress of the inner search; all of it is in the checkpoint, so a resumed trial picks up mid-search.
    progress: dict[str, Any] = {"candidate": 0, "epoch": 0, "finished": [], "kept": None, "kept_loss": math.inf,
                                "chosen": None, "chosen_loss": math.inf}
    if state is not None and "progress" in state:
        progress = dict(state["progress"])
    elif state is not None:  # a checkpoint from before the inner search: one candidate, mid-way
        progress["epoch"] = int(state["epoch"])

    result: dict[str, Any] = {}
    total_steps = len(candidates) * epochs
    last_checkpoint = time.monotonic()
    for ci in range(int(progress["candidate"]), len(candidates)):
        lr, wd = candidates[ci]
        model, opt, info, (pretrain_ref, loaded) = build(lr, wd)
        gen = torch.Generator().manual_seed(seed)
        start_epoch = 0
        if state is not None and int(progress["candidate"]) == ci and int(progress["epoch"]) > 0:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            gen.set_state(state["generator"])
            if "torch_rng" in state:  # dropout draws from the global RNG; older checkpoints lack it
                torch.set_rng_state(state["torch_rng"])
            if "cuda_rng" in state and device.type == "cuda":
                torch.cuda.set_rng_state(state["cuda_rng"])
            start_epoch = int(progress["epoch"])
        if not feature_note or plan is not None:  # the first candidate decides; later ones rebuild the plan
            plan, feature_note = use_features(model, info, loaded)
        net = plan.suffix if plan is not None else model
        fit_x = (torch.from_numpy(np.asarray(features["finetune"][chosen.indices])).to(device, plan.dtype)
                 if plan is not None and dataset.in_memory else x)
        static = {"requested_magnitude": chosen.requested, "achieved_magnitude": chosen.achieved,
                  "n_finetune": int(len(chosen.indices)), "n_groups": info.n_groups,
                  "frozen_groups": json.dumps(list(info.frozen_groups)), "frozen_fraction": info.frozen_fraction,
                  "pretrain_ref": pretrain_ref or "", "device": str(device),
                  "compute_precision": computed, "feature_cache": feature_note,
                  "preprocessing": dataset.preprocessing_record()}
        train_mode = (net.train if plan is not None  # noqa: E731 - frozen layers stay in eval
                      else lambda: backbones.set_train_mode(model, info))
        for epoch in range(start_epoch, epochs):
            if fit_x is not None:
                loss = loop.train_epoch(net, fit_x, y, opt, batch_size=batch_size, generator=gen, device=device,
                                        train_mode=train_mode, precision=precision)
            else:  # the order comes from (seed, epoch), so a resumed trial replays the same epoch
                order = dict(batch_size=batch_size, shuffle=True, seed=seed, epoch=epoch,
                             drop_last=len(chosen.indices) > batch_size)
                stream = (feature_batches("finetune", chosen.indices, batch_order(len(chosen.indices), **order))
                          if plan is not None else dataset.loader("finetune", chosen.indices, **order))
                loss = loop.train_epoch_batches(net, stream, y, opt, device=device, train_mode=train_mode,
                                                precision=precision)
            val_scores = scores(net, "val")
            val_loss = _val_loss(val_scores, val_labels)
            if select_epoch == "best_val_loss" and val_loss < progress["kept_loss"]:  # ties: the earlier epoch
                progress.update(kept=snapshot(model), kept_loss=val_loss, kept_epoch=epoch + 1)
            progress["epoch"] = epoch + 1
            if epoch + 1 == epochs:  # this candidate is done: compare its kept epoch with the best so far
                if select_epoch == "last":
                    progress.update(kept=snapshot(model), kept_loss=val_loss, kept_epoch=epochs)
                progress["finished"] = [*progress["finished"], {"lr": lr, "weight_decay": wd,
                                                                "val_loss": progress["kept_loss"],
                                                                "epoch": progress["kept_epoch"]}]
                if progress["kept_loss"] < progress["chosen_loss"]:  # ties: the earlier candidate
                    progress.update(chosen=progress["kept"], chosen_loss=progress["kept_loss"], chosen_index=ci)
                if ci + 1 < len(candidates):
                    progress.update(candidate=ci + 1, epoch=0, kept=None, kept_loss=math.inf)
            step = ci * epochs + epoch + 1
            # the objectives on validation first: Tune's progress table (--verbose) shows a trial's first metrics
            result = {**_validation_objectives(val_scores, dataset, ft, context, metrics), **static, "epoch": step,
                      "train_loss": loss, "val_loss": val_loss}
            with tempfile.TemporaryDirectory() as d:
                if step == total_steps or time.monotonic() - last_checkpoint >= checkpoint_interval_s:
                    saved = {"model": model.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                             "torch_rng": torch.get_rng_state(), "epoch": step, "progress": progress}
                    if device.type == "cuda":
                        saved["cuda_rng"] = torch.cuda.get_rng_state()
                    torch.save(saved, Path(d) / STATE_FILE)
                    last_checkpoint = time.monotonic()
                if step == total_steps:
                    model.load_state_dict(progress["chosen"])
                    pick = progress["finished"][progress["chosen_index"]]
                    result.update(_evaluate(lambda split: scores(net, split), dataset, ft, Path(d), metrics,
                                            context))
                    result.update({"chosen_hparams": {"lr": pick["lr"], "weight_decay": pick["weight_decay"]},
                                   "selected_epoch": pick["epoch"], "selected_val_loss": pick["val_loss"]})
                    if len(candidates) > 1:
                        table = pd.DataFrame(progress["finished"])
                        table["chosen"] = [i == progress["chosen_index"] for i in range(len(table))]
                        table.to_csv(Path(d) / INNER_SEARCH_FILE, index=False)
                if on_epoch is not None:
                    on_epoch(result, Path(d))
    return result


def finetune_trial(config: Mapping[str, Any], context: TrialContext) -> None:
    """Function trainable for ``tune.with_parameters(finetune_trial, context=...)``; the trial arrives as
    ``config[TUNE_KEY]``, a ``TrialConfig`` dict (a grid cell, or the searcher's proposal). A thin wrapper:
    Tune's checkpoint in, one report per epoch out, with a checkpoint when one was due; the work is
    ``train_and_evaluate``."""
    import torch
    from ray import tune

    trial = TrialConfig.from_tune(config)
    for done, objectives in context.finished:
        if done == trial:
            tune.report({"already_finished": True, **objectives})
            return
    built = _pretrained_base(trial, context)
    state = None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    from trainables import loop

    with loop.memory_hint(loop.select_device(), int(trial.finetune["batch_size"])):
        train_and_evaluate(trial, context, state=state, checkpoint_interval_s=context.checkpoint_interval_s,
                           on_epoch=lambda result, d: tune.report({**_reportable(result), **built},
                                                                  checkpoint=tune.Checkpoint.from_directory(d)
                                                                  if (d / STATE_FILE).exists() else None))


def _pretrained_base(trial: TrialConfig, context: TrialContext) -> dict[str, str]:
    """Build the trial's pretrained base if no trial has yet (in this worker, on the trial's resources: a sweep
    starts no other process for it), or wait on the key's lock for the trial building it, or find it built.
    Returns what to add to each report: how the base was built, for the driver's pretraining run; raises
    ``PretrainingFailedError`` when it could not be built in this run of the sweep."""
    job = context.pretrain_jobs.get(trial.weights.key or "")
    if job is None:
        return {}
    outcome = pretrain.run_pretrain_job(job, context.cache_root, context.cpus_per_trial, context.input_cache,
                                        context.input_cache_bytes, driver_run=context.driver_run or None)
    return {PRETRAIN_OUTCOME: json.dumps(asdict(outcome), default=str)}


def _reportable(result: Mapping[str, Any]) -> dict[str, Any]:
    """The result with non-finite values left out (Tune's loggers warn on every one; MLflow cannot hold them):
    undefined ones (NaN: an interval of one value) are dropped, and the names of infinite ones (a ratio
    against a zero rate) are listed in ``infinite_metrics``, so the search can still be told the value."""
    out = {k: v for k, v in result.items() if not (isinstance(v, float) and not math.isfinite(v))}
    infinite = sorted(k for k, v in result.items() if isinstance(v, float) and math.isinf(v) and v > 0)
    if infinite:
        out["infinite_metrics"] = ",".join(infinite)
    return out


def _validation_objectives(scores: np.ndarray, dataset: Any, ft: Mapping[str, Any], context: TrialContext,
                            metrics: Any) -> dict[str, float]:
    """The sweep's objectives on the validation split at this epoch (``val_NAME``, at the trial's threshold
    rule), so progress shows what the choice will be made on; the final result replaces them."""
    if not context.objectives:
        return {}
    meta = dataset.meta("val")
    rule = ft.get("threshold", "calibrated")
    threshold = metrics.calibrated_threshold(meta.labels, scores) if rule == "calibrated" else float(rule)
    named = {attr: _group_labels(codes, dataset.group_names.get(attr)) for attr, codes in meta.attributes.items()}
    privileged = {**dict(dataset.privileged), **dict(context.privileged)}
    values = metrics.evaluate(meta.labels, scores, named, primary=dataset.primary, threshold=threshold,
                              **({"privileged": privileged} if privileged else {})).metrics
    return {f"val_{m}": float(values[m]) for m in context.objectives if m in values}


def _split_scores(model: Any, dataset: Any, split: str, batch_size: int, device: Any, precision: str,
                  loop: Any) -> np.ndarray:
    n = len(dataset.meta(split))
    if dataset.in_memory:
        return loop.predict_scores(model, worker_cache.split_inputs(dataset, split).to(device), batch_size=batch_size,
                                   device=device, precision=precision)
    return loop.predict_scores_batches(model, dataset.loader(split, batch_size=batch_size), n, device=device,
                                       precision=precision)


def _evaluate(score: Callable[[str], np.ndarray], dataset: Any, ft: Mapping[str, Any], out: Path, metrics: Any,
              context: TrialContext) -> dict:
    """Validation and test metrics at one decision threshold, chosen on validation (test only reports).

    ``threshold: calibrated`` is paper A's rule: on the validation split, as many predicted positives
    as true positives (``metrics.calibrated_threshold``). Validation metrics carry the ``val_`` prefix.
    With ``evaluation.bootstrap`` > 0 the test split's objectives and HEADLINE_METRICS get stratified
    bootstrap intervals ``NAME.ci_low`` / ``NAME.ci_high``. Predictions of both splits and the test
    split's per-group table are written into ``out``.
    """
    scores = {split: score(split) for split in ("val", "test")}
    rule = ft.get("threshold", "calibrated")
    threshold = (metrics.calibrated_threshold(dataset.meta("val").labels, scores["val"]) if rule == "calibrated"
                 else float(rule))
    # the privileged group per attribute: the spec's, else the dataset's, else the metrics' default (the
    # largest group), worked out once on the test split and then used for both splits and the bootstrap, so
    # a signed metric compares the same groups on validation and test
    privileged = {**dict(dataset.privileged), **dict(context.privileged)}
    result: dict[str, Any] = {"threshold": float(threshold)}
    for split, prefix, file in (("test", "", PREDICTIONS_FILE), ("val", "val_", VAL_PREDICTIONS_FILE)):
        meta = dataset.meta(split)
        named = {attr: _group_labels(codes, dataset.group_names.get(attr)) for attr, codes in meta.attributes.items()}
        ev = metrics.evaluate(meta.labels, scores[split], named, primary=dataset.primary, threshold=threshold,
                              **({"privileged": privileged} if privileged else {}))
        privileged = {**dict(ev.privileged), **privileged}
        result.update({prefix + k: float(v) for k, v in ev.metrics.items()})
        frame = pd.DataFrame({"y_true": meta.labels, "y_score": scores[split],
                              "y_pred": (scores[split] >= threshold).astype(int)})
        for attr, labels in named.items():
            frame["group" if attr == dataset.primary else f"group.{attr}"] = labels
        frame.to_csv(out / file, index=False, compression="gzip")
        if split == "test":
            ev.per_group.to_csv(out / PER_GROUP_FILE, index=False)
            if context.bootstrap > 0:
                wanted = [m for m in dict.fromkeys((*context.objectives, *HEADLINE_METRICS)) if m in ev.metrics]
                intervals = metrics.bootstrap_ci(meta.labels, scores[split], named, primary=dataset.primary,
                                                 metrics=wanted, n_resamples=context.bootstrap, threshold=threshold,
                                                 seed=0, privileged=privileged)
                for m, (low, high) in intervals.items():
                    result[f"{m}.ci_low"], result[f"{m}.ci_high"] = low, high
    return {**result, "done_training": True}


def _group_labels(codes: np.ndarray, names: Any) -> np.ndarray:
    """Group names where the dataset provides them, so tables read 'red'/'green' rather than 0/1."""
    return np.asarray(names, dtype=object)[codes] if names else codes
