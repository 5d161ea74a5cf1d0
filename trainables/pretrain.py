"""Running one pretraining job: build (or reuse) its entry in the pretraining cache (docs/architecture.md,
decision 3). The paradigms live in ``trainables.paradigms``, the cache in ``trainables.pretrain_cache``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from trainables import backbones
from trainables.errors import FairsweepError
from trainables.paradigms import TrainContext, lookup
from trainables.pretrain_cache import PretrainCache
from trainables.trial import PretrainJob

__all__ = ["run_pretrain_job", "PretrainOutcome", "PretrainingFailedError", "model_view", "preprocessing_part",
           "built_precision"]

_log = logging.getLogger(__name__)
# builds of one base in one run of a sweep whose worker died (the old Ray task's one retry); then the base fails
MAX_BUILDS_PER_RUN = 2


# ----------------------------------------------------------------------------- the model's preprocessing


def model_view(dataset: Any, backbone: str) -> Any:
    """``dataset`` as ``backbone`` expects its pixels (its timm data config: mean, std, interpolation,
    crop); generated data, which has no preprocessing, is returned as is without building anything."""
    if dataset.preprocessing is None:
        return dataset
    return dataset.for_model(backbones.data_config(backbone, dataset.input_shape))


def preprocessing_part(dataset: Any, backbone: str) -> dict[str, str]:
    """``{"preprocessing": canonical text}`` for a pretraining job's hyper-parameters, so its key (and its
    MLflow run) name the preprocessing its base was trained under; ``{}`` for generated data, whose keys
    stay as they were."""
    record = model_view(dataset, backbone).preprocessing_record()
    return {"preprocessing": record} if record else {}


# ----------------------------------------------------------------------------- running a job


class PretrainingFailedError(FairsweepError, RuntimeError):
    """A pretrained base could not be built; the message says which and why."""


@dataclass(frozen=True)
class PretrainOutcome:
    key: str
    path: str
    reused: bool  # True: an intact entry existed and nothing trained
    rebuilt_damaged: bool  # True: a damaged entry was found, discarded and rebuilt
    losses: tuple[float, ...] = ()
    seconds: float = 0.0
    device: str = "cpu"
    meta: Mapping[str, Any] = field(default_factory=dict)


def built_precision(meta: Mapping[str, Any]) -> str:
    """What a cache entry was trained in: its meta says so; entries made before resources.precision existed were
    bf16 if trained on a GPU (autocast was always on there) and fp32 otherwise."""
    return str(meta.get("precision") or ("bf16" if str(meta.get("device", "cpu")).startswith("cuda") else "fp32"))


def run_pretrain_job(job: Mapping[str, Any], cache_root: str, cpus: float = 1.0,
                     input_cache: str | None = None, input_cache_bytes: int | None = None, *,
                     driver_run: str | None = None) -> PretrainOutcome:
    """Build (or reuse) one cache entry. ``job`` is a ``PretrainJob`` as a dict (``to_dict``); runs in the trial
    that first needs the base (``trainables.finetune``), or anywhere else (tests, benchmarks).
    ``input_cache``: the folder where folder images are decoded once (``Dataset.with_input_cache``); None: never.
    ``input_cache_bytes``: its budget (resources.input_cache_gb); None: the dataset's default.

    Holding the key's lock, an intact entry is returned as is; a missing or damaged one is (re)built on
    ``loop.select_device()`` and written atomically. Concurrent calls for one key train it once.

    ``driver_run`` names one driver's run of a sweep: an entry built in it says so (meta ``built_in_run``, so a
    trial that waited for another one's build tells the driver it was built, not found); a build that raises
    is recorded under it and raised as ``PretrainingFailedError``, and every later call with the same name (the
    other trials of that base, waiting on the lock) raises the recorded error at once instead of training
    again, as it does once MAX_BUILDS_PER_RUN builds died with their worker; another run builds again.
    """
    job = PretrainJob.from_dict(job)
    cache = PretrainCache(cache_root)
    key = job.key
    with cache.lock(key):
        failed = cache.recorded_failure(key, driver_run) if driver_run else None
        if failed:
            raise PretrainingFailedError(failed)
        try:
            return _build(job, cache, cpus, input_cache, input_cache_bytes, driver_run)
        except Exception as exc:
            if not driver_run:
                raise
            message = (str(exc) if isinstance(exc, PretrainingFailedError) else
                       f"pretraining {job.backbone}/{job.paradigm} (key {key}) failed: {type(exc).__name__}: {exc}")
            cache.record_failure(key, driver_run, message[:2000])
            raise PretrainingFailedError(message[:2000]) from exc


def _count_build(job: PretrainJob, cache: PretrainCache, driver_run: str) -> None:
    """Count a build starting in ``driver_run``. A build that ended wrote an entry or a failure, which later calls
    see first; so builds counted before this one died with their worker (killed for memory, a lost node). After
    MAX_BUILDS_PER_RUN of them the base fails instead of crashing every trial of it in turn."""
    died = cache.start_build(job.key, driver_run)
    if died >= MAX_BUILDS_PER_RUN:
        raise PretrainingFailedError(f"pretraining {job.backbone}/{job.paradigm} (key {job.key}) failed: its worker "
                                     f"died during {died} builds in this run of the sweep (killed for memory? the Ray "
                                     f"logs of its trials say why)")


def _build(job: PretrainJob, cache: PretrainCache, cpus: float, input_cache: str | None,
           input_cache_bytes: int | None, driver_run: str | None) -> PretrainOutcome:
    """``run_pretrain_job``'s work, under the key's lock."""
    # torch and the modules that import it (loop, trainables.data) load here, in the worker: orchestrator.launch
    # imports this module and must import without torch
    import torch

    from trainables import loop
    from trainables.data import build_dataset

    key, cache_root = job.key, str(cache.root)
    status = cache.status(key)
    device = loop.select_device()
    wanted = loop.effective_precision(device, job.hparams.precision)
    if status == "ok":
        meta = cache.meta(key)
        built = built_precision(meta)
        if built == wanted:
            return PretrainOutcome(key, str(cache.entry(key)), True, False, tuple(meta.get("losses", ())), 0.0,
                                   meta.get("device", "cpu"), meta)
        _log.warning("pretraining cache entry %s under %s was trained in %s, not %s; rebuilding it", key,
                     cache_root, built, wanted)
    if status == "damaged":
        _log.warning("pretraining cache entry %s under %s is damaged; discarding and rebuilding it", key, cache_root)
    if driver_run:
        _count_build(job, cache, driver_run)
    cache._sweep_leftovers(key)
    loop.set_threads(cpus)
    loop.set_precision(job.hparams.precision)
    started = time.time()
    hp = job.hparams.to_dict()
    paradigm = lookup(job.paradigm)
    options = paradigm.resolve_options(job.hparams.options)
    dataset = model_view(build_dataset(job.dataset, job.dataset_options), job.backbone)
    dataset = dataset.with_input_cache(input_cache, input_cache_bytes)
    planned = job.hparams.preprocessing
    if planned is not None and planned != dataset.preprocessing_record():
        raise ValueError(f"pretraining job {key} was planned with preprocessing {planned} but this worker resolves "
                         f"{dataset.preprocessing_record() or 'none'} for {job.backbone!r}; install the same "
                         "timm version on the driver and every worker")
    torch.manual_seed(job.hparams.seed)
    gen = torch.Generator().manual_seed(job.hparams.seed)
    ctx = TrainContext(job.backbone, dataset, hp, MappingProxyType(options), device, gen, job.hparams.precision)
    with loop.memory_hint(device, job.hparams.batch_size):
        model, losses = paradigm.trainer(paradigm, ctx)
    meta = {"backbone": job.backbone, "paradigm": job.paradigm, "dataset": job.dataset,
            "dataset_options": dict(job.dataset_options), "hparams": hp, "options": options,
            "losses": [float(v) for v in losses], "device": str(device),
            "precision": wanted, "seconds": time.time() - started,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "rebuilt_damaged": status == "damaged",
            **({"built_in_run": driver_run} if driver_run else {}), **paradigm.key_parts(job.backbone)}
    path = cache.write(key, backbones.backbone_state_dict(model), meta)
    return PretrainOutcome(key, str(path), False, status == "damaged", tuple(meta["losses"]), meta["seconds"],
                           str(device), cache.meta(key))
