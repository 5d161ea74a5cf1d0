"""Driver-side MLflow writer: a parent run per sweep, a child run per trial, a run per pretraining job.

Only the driver writes MLflow (docs/architecture.md, decision 2). Runs are found again by their tags (sweep name,
trial key, pretraining key), never remembered only in memory, so a restarted driver continues the
same runs instead of opening duplicates — the failure of Ray's stock MLflowLoggerCallback.

torch and what loads it (``mlflow.pytorch``, safetensors, ``trainables.data``) are imported inside the functions
that log models or weights: ``fairsweep status`` imports this module (``driver_alive``) and must not load torch.
"""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import sys
import tempfile
import time
import traceback
import uuid
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import yaml
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag

from orchestrator import pareto as pareto_mod
from orchestrator import raylocal  # noqa: F401 - before the first import of ray: a local Ray binds to 127.0.0.1
from orchestrator.driverlock import driver_id
from orchestrator.figures import pareto_figure
from orchestrator.mlflow_runs import TAGS, WEIGHTS_ARTIFACT, find_parent_run, run_filter, search_runs
from orchestrator.plan import Plan, PlannedTrial
from orchestrator.query import (_direction, _is_signed, _objective_values, abs_columns, front_table,
                                 hypervolume_reference, load_trials)
from orchestrator.store import open_client
from ray import tune  # noqa: E402 - after raylocal
from trainables import backbones
from trainables.finetune import (INNER_SEARCH_FILE, PER_GROUP_FILE, PREDICTIONS_FILE, PRETRAIN_OUTCOME, STATE_FILE,
                                 VAL_PREDICTIONS_FILE)
from trainables.pretrain import PretrainingFailedError, PretrainOutcome, built_precision
from trainables.trial import TrialConfig, TrialPoint, canonical_hash

__all__ = ["SweepTracker", "driver_id", "driver_alive"]

# Result keys that are bookkeeping, not metrics.
FRONT_MARK = "[front] "  # prefixed to the run names of the front's members (the MLflow UI's run list)
FRONT_REFRESH_S = 5.0  # the front is recomputed at most this often while trials finish, and at the end
_PER_EPOCH = {"train_loss", "val_loss", "epoch"}  # logged every epoch; everything else once, with the final result
_NON_METRIC = {"frozen_groups", "pretrain_ref", PRETRAIN_OUTCOME, "device", "compute_precision", "done_training", "chosen_hparams",
               "infinite_metrics", "feature_cache", "preprocessing", "trial_id", "date",
               "hostname", "node_ip",
               "pid", "experiment_id", "experiment_tag", "timestamp", "time_this_iter_s", "time_total_s",
               "time_since_restore", "iterations_since_restore", "training_iteration", "checkpoint_dir_name",
               "should_checkpoint", "done", "config"}


class SweepTracker(tune.Callback):
    """Writes one sweep into one MLflow experiment and keeps its Pareto front current."""

    def __init__(self, plan: Plan, tracking_uri: str, *, artifact_location: str | None = None,
                 progress: Any = None, driver_run: str | None = None, cache_root: str | None = None):
        self.plan = plan
        self.cache_root = cache_root  # the pretraining cache: bases no trial reported are logged from it
        # names this driver's run of the sweep for the trials (TrialContext.driver_run): a base built under it was
        # built by this sweep now, even when the first trial to report it only waited for another one's build
        self.driver_run = driver_run or uuid.uuid4().hex[:12]
        self.tracking_uri = tracking_uri
        self.artifact_location = artifact_location
        self.spec = plan.spec
        self._client = None
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self._runs: dict[str, str] = {}  # Tune trial id -> MLflow run id
        self._pretrain_runs: dict[str, str] = {}  # pretraining key -> MLflow run id
        self._pretrain_failures: dict[str, str] = {}  # pretraining key -> its FAILED run in this driver
        self._front_state: dict[str, str] = {}  # run id -> last written pareto tag
        self._done_before: set[str] = set()  # run ids already FINISHED when their Tune trial (re)started
        self._last_step: dict[str, int] = {}  # run id -> last epoch step logged
        self._known: dict[str, tuple[str, str, bool]] = {}  # trial key -> (run id, status, has an error tag), at open
        self._errored: set[str] = set()  # run ids carrying an error tag (cleared when they finish)
        self._key_of: dict[str, str] = {}  # run id -> its trial key
        self._run_names: dict[str, str] = {}  # run id -> its name without the front marker
        self._final_checkpoints: dict[str, tuple[str, str]] = {}  # run id -> (backbone, final checkpoint path)
        self._models_logged: set[str] = set()
        self._front_at = -math.inf  # when the front was last recomputed (time.monotonic)
        self.progress = progress  # Callable[[str], None]: one line on the sweep every few seconds (the CLI's)
        self._progress_at = -math.inf
        self._started_at = time.monotonic()
        self._front_size = 0
        self._val_best: list[float] | None = None  # the best val (perf, fairness) of the finished trials
        self._ended_at: list[float] = []  # when each trial this driver saw end ended (time.monotonic)

    # -- plumbing -------------------------------------------------------------------------------
    @property
    def client(self) -> Any:
        """Created on first use (the store with it, for SQLite); calls wait out a locked SQLite file."""
        if self._client is None:
            self._client = open_client(self.tracking_uri, create=True)
        return self._client

    def __getstate__(self) -> dict:  # Tune pickles callbacks into its experiment state
        state = dict(self.__dict__)
        state["_client"] = None
        state["progress"] = None  # a function of this driver's terminal: not part of the sweep's state
        return state

    # -- sweep ----------------------------------------------------------------------------------
    def open(self) -> str:
        """Create or continue the sweep's parent run; returns its run id."""
        exp = self.client.get_experiment_by_name(self.spec.experiment)
        if exp is None:
            self.experiment_id = self.client.create_experiment(self.spec.experiment, artifact_location=self.artifact_location)
        else:
            self.experiment_id = exp.experiment_id
        existing = find_parent_run(self.client, self.experiment_id, self.spec.name)
        self._known = {}
        if existing is not None:
            self.parent_run_id = existing.info.run_id
            self.client.update_run(self.parent_run_id, status="RUNNING")
            # the runs a resumed sweep already has, read once: a trial then finds its own run without a search
            for r in self._trial_runs():
                key = r.data.tags.get(TAGS.TRIAL_KEY)
                if key and (key not in self._known or r.info.status == "FINISHED"):
                    self._known[key] = (r.info.run_id, r.info.status, TAGS.ERROR in r.data.tags)
                self._run_names[r.info.run_id] = (r.info.run_name or "").removeprefix(FRONT_MARK)
        else:
            run = self.client.create_run(self.experiment_id, run_name=self.spec.name,
                                         tags={TAGS.SWEEP: self.spec.name, TAGS.KIND: "sweep"})
            self.parent_run_id = run.info.run_id
            self._log_sweep_description()
        self.client.set_tag(self.parent_run_id, TAGS.DRIVER, driver_id())
        return self.parent_run_id

    def _log_sweep_description(self) -> None:
        s = self.spec
        params = {"dataset": s.dataset.name, "search.type": s.search.type, "n_trials": s.n_trials, "grid_size": s.grid_size,
                  "n_pretrain_jobs": len(self.plan.pretrain_jobs), "objectives.performance": s.objectives.performance,
                  "objectives.fairness": s.objectives.fairness, "finetune.size": _one_or_list(s.axes.finetune_size),
                  "finetune.epochs": s.finetune.epochs}
        if s.search.type == "optuna":
            params.update({"search.sampler": s.search.sampler, "search.budget": s.search.budget, "search.seed": s.search.seed})
            self.client.set_tag(self.parent_run_id, TAGS.STUDY_NAME, s.name)
        self.client.log_batch(self.parent_run_id, params=[Param(k, str(v)) for k, v in params.items()])
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "spec.yaml").write_text(yaml.safe_dump(dict(s.source), sort_keys=False))
            (Path(d) / "plan.txt").write_text(self.plan.summary(n_examples=len(self.plan.trials)))
            self.client.log_artifacts(self.parent_run_id, d)

    def close(self, status: str = "FINISHED") -> None:
        if self.parent_run_id:
            self.client.set_terminated(self.parent_run_id, status=status)

    # -- pretraining ----------------------------------------------------------------------------
    # The trials build their bases (trainables/finetune.py) and say how in their reports (PRETRAIN_OUTCOME); the
    # first report naming a key logs its pretraining run, and a trial that failed building one logs the failure.
    def announce_pretraining(self) -> None:
        jobs = self.plan.pretrain_jobs
        if self.progress and jobs:
            names = ", ".join(f"{j.backbone}/{j.paradigm}" for j in jobs)
            self.progress(f"pretraining: {len(jobs)} job(s) ({names})" if self._every_base_runs() else
                          f"pretraining: up to {len(jobs)} job(s), each when the search first picks its base ({names})")

    def _every_base_runs(self) -> bool:
        """A grid runs every cell, so every base of the plan is built; a search builds only the bases it picks,
        and may never pick some within its budget."""
        return self.spec.search.type == "grid"

    def _note_pretraining(self, result: Mapping[str, Any]) -> str | None:
        """Log the pretraining run of the base a trial's report says it built (or found built), once per key;
        returns that run's id (None when the trial starts from no pretrained base)."""
        raw = result.get(PRETRAIN_OUTCOME)
        if not raw:
            return None
        outcome = PretrainOutcome(**json.loads(raw))
        if outcome.key in self._pretrain_runs:
            return self._pretrain_runs[outcome.key]
        job = self._pretrain_job(outcome.key)
        if job is None:
            return None
        return self._log_pretrain_outcome(job, outcome)

    def _pretrain_job(self, key: str | None) -> Any:
        """The plan's pretraining job of ``key`` (None: no pretrained base, or not this plan's)."""
        return next((j for j in self.plan.pretrain_jobs if j.key == key), None) if key else None

    def _log_pretrain_outcome(self, job: Any, outcome: PretrainOutcome) -> str:
        if outcome.reused and outcome.meta.get("built_in_run") == self.driver_run:  # found, but built in this run
            outcome = replace(outcome, reused=False, seconds=float(outcome.meta.get("seconds", 0.0)),
                              rebuilt_damaged=bool(outcome.meta.get("rebuilt_damaged")))
        run_id = self.log_pretrain(job, outcome)
        if self.progress:
            how = ("from the cache" if outcome.reused else
                   f"{len(outcome.losses)} epochs, last loss {outcome.losses[-1]:.4f}" if outcome.losses else "built")
            done, jobs = len(self._pretrain_runs), len(self.plan.pretrain_jobs)
            count = f"{done}/{jobs}" if self._every_base_runs() else f"{done} of up to {jobs}"
            self.progress(f"pretraining {count} done: {job.backbone}/{job.paradigm} ({how}, {outcome.seconds:.0f} s)")
        return run_id

    def log_unreported_pretraining(self, keys: Any = None) -> None:
        """Log, from the cache entry's meta, the pretraining run of a base no trial reported in this driver: the
        bases of ``keys`` (trials of theirs failed before a report), else every base built in this run (all its
        trials failed before reporting). A base only found in the cache and never used gets no run."""
        if not self.cache_root:
            return
        from trainables.pretrain_cache import PretrainCache

        cache = PretrainCache(self.cache_root)
        for job in self.plan.pretrain_jobs:
            if job.key in self._pretrain_runs or (keys is not None and job.key not in keys):
                continue
            try:  # the meta first: checking an entry's status hashes its weights
                meta = cache.meta(job.key)
                if (keys is None and meta.get("built_in_run") != self.driver_run) or cache.status(job.key) != "ok":
                    continue
            except (OSError, ValueError):  # no entry, or a cache this driver cannot read: nothing to log
                continue
            self._log_pretrain_outcome(job, PretrainOutcome(
                job.key, str(cache.entry(job.key)), True, bool(meta.get("rebuilt_damaged")),
                tuple(meta.get("losses", ())), 0.0, str(meta.get("device", "cpu")), meta))

    def _note_pretraining_failure(self, trial: Any, error: str) -> str:
        """A trial that failed because its base could not be built: the failure is logged as a FAILED pretrain
        run (once per key in this driver) and the trial's error names it and how to retry."""
        job = self._pretrain_job(self.plan.trial_for(trial.config).config.weights.key)
        if job is None:
            return error
        if PretrainingFailedError.__name__ not in error:  # it failed after its base was built: name that run
            self.log_unreported_pretraining(keys={job.key})
            if job.key in self._pretrain_runs:
                self.client.set_tag(self._trial_run(trial), TAGS.PRETRAIN_RUN, self._pretrain_runs[job.key])
            return error
        if job.key not in self._pretrain_failures:
            self._pretrain_failures[job.key] = self.log_pretrain_failure(job, error)
        return (f"{error.rstrip()}\npretraining {job.backbone}/{job.paradigm} failed (MLflow run "
                f"{self._pretrain_failures[job.key]}); fix it and `fairsweep resume {self.spec.name} --retry-errored`")

    def log_pretrain(self, job: Any, outcome: Any) -> str:
        """One run per pretraining key (reused if this experiment already has one)."""
        found = list(search_runs(self.client, [self.experiment_id],
                                 run_filter(kind="pretrain", status="FINISHED", pretrain_key=job.key), limit=1))
        if found:
            run_id = found[0].info.run_id
        else:
            now = int(time.time() * 1000)
            metrics = [Metric("loss", float(v), now, i + 1) for i, v in enumerate(outcome.losses)]
            metrics.append(Metric("seconds", float(outcome.meta.get("seconds", outcome.seconds)), now, 0))
            run_id = self._pretrain_run(job, "FINISHED", {TAGS.REUSED_CACHE: str(outcome.reused).lower(),
                                                          TAGS.REBUILT_DAMAGED: str(outcome.rebuilt_damaged).lower(),
                                                          TAGS.CACHE_PATH: outcome.path,
                                                          TAGS.DEVICE: outcome.device,
                                                          TAGS.PRECISION: built_precision(outcome.meta)}, metrics)
        self._pretrain_runs[job.key] = run_id
        return run_id

    def log_pretrain_failure(self, job: Any, error: str) -> str:
        """A FAILED pretrain run holding the job's error (one per failed attempt, so none is hidden)."""
        return self._pretrain_run(job, "FAILED", {TAGS.ERROR: error[-4000:]}, [])

    def _pretrain_run(self, job: Any, status: str, tags: Mapping[str, str], metrics: list) -> str:
        run = self.client.create_run(self.experiment_id, run_name=f"pretrain-{job.backbone}-{job.paradigm}",
                                     tags={TAGS.KIND: "pretrain", TAGS.PRETRAIN_KEY: job.key, TAGS.SWEEP: self.spec.name,
                                           TAGS.PARENT: self.parent_run_id, **tags})
        params = {"backbone": job.backbone, "paradigm": job.paradigm, "dataset": job.dataset,
                  **{f"pretraining.{k}": v for k, v in job.hparams.to_dict().items()}}
        self.client.log_batch(run.info.run_id, params=[Param(k, json.dumps(v) if isinstance(v, dict) else str(v))
                                                       for k, v in params.items()], metrics=metrics)
        self.client.set_terminated(run.info.run_id, status)
        return run.info.run_id

    # -- trials ---------------------------------------------------------------------------------
    def finished_trials(self) -> list[tuple[TrialConfig, dict]]:
        """(trial, objective metrics) of every trial with a FINISHED run of this plan's trial
        key: the ground truth resume uses to skip work. The metrics go back to the search, which
        counts the trial as finished rather than failed. A run under another key (the finetuning
        settings or the data changed) is not this trial's result, so its point is trained again."""
        objectives = (self.spec.objectives.performance, self.spec.objectives.fairness)
        objectives = (*objectives, *(f"val_{m}" for m in objectives))  # the search is told the val_ ones
        out = []
        for r in self._trial_runs("FINISHED"):
            if TAGS.POINT not in r.data.tags:
                continue
            try:
                planned = self.plan.resolve(TrialPoint.from_dict(json.loads(r.data.tags[TAGS.POINT])))
            except (KeyError, TypeError, ValueError):  # a point this plan cannot hold is not one of its trials
                continue
            if r.data.tags.get(TAGS.TRIAL_KEY) == planned.key:
                values = {m: r.data.metrics[m] for m in objectives if m in r.data.metrics}
                infinite = [m for m in r.data.tags.get(TAGS.INFINITE_METRICS, "").split(",") if m in objectives]
                if infinite:  # MLflow cannot hold +inf: the tag names them, so the search is told them again
                    values["infinite_metrics"] = ",".join(infinite)
                out.append((planned.config, values))
        return out

    def _trial_run(self, trial: Any) -> str:
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        planned = self.plan.trial_for(trial.config)
        found = self._known.get(planned.key)
        if found:  # a resumed trial continues its own run
            run_id, status, had_error = found
            if had_error:
                self._errored.add(run_id)
            if status == "FINISHED":
                self._done_before.add(run_id)  # finished after Tune's last state save: leave it as it is
            else:
                self.client.update_run(run_id, status="RUNNING")
                # it continues from its last checkpoint and reports again the epochs since: log each once
                history = self.client.get_metric_history(run_id, "train_loss")
                self._last_step[run_id] = max((m.step for m in history), default=0)
        else:
            run_id = self._create_trial_run(planned, trial.trial_id)
            # another trial of this key in this driver (a search proposing it again) finds this run
            self._known[planned.key] = (run_id, "RUNNING", False)
        self._runs[trial.trial_id] = run_id
        self._key_of[run_id] = planned.key
        return run_id

    def _settle(self, run_id: str, status: str) -> None:
        """Record how a run ended, for later trials of the same key in this driver."""
        self._ended_at.append(time.monotonic())
        key = self._key_of.get(run_id)
        if key is not None:
            self._known[key] = (run_id, status, status == "FAILED")

    def _create_trial_run(self, planned: PlannedTrial, tune_id: str) -> str:
        p = planned.point
        tags = {TAGS.SWEEP: self.spec.name, TAGS.KIND: "trial", TAGS.TRIAL_KEY: planned.key,
                TAGS.CONFIG_KEY: planned.config_key, TAGS.PARENT: self.parent_run_id, TAGS.TUNE_TRIAL_ID: tune_id,
                TAGS.POINT: json.dumps(p.to_dict(), sort_keys=True)}
        pretrain_key = planned.config.weights.key
        if pretrain_key:
            tags[TAGS.PRETRAIN_KEY] = pretrain_key
            if pretrain_key in self._pretrain_runs:
                tags[TAGS.PRETRAIN_RUN] = self._pretrain_runs[pretrain_key]
        run = self.client.create_run(self.experiment_id, run_name=p.run_name(), tags=tags)
        self._run_names[run.info.run_id] = p.run_name()
        params = {"dataset": self.spec.dataset.name, **planned.config.params(),
                  "frozen_groups": json.dumps(list(planned.frozen_groups)), "n_layer_groups": planned.n_groups}
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
        self.client.log_inputs(run.info.run_id, datasets=self._dataset_inputs(planned))
        return run.info.run_id

    def _dataset_inputs(self, planned: PlannedTrial) -> list:
        """The trial's data as MLflow dataset inputs (the run page's "Datasets used"): its finetuning set,
        named by the intervention that chose it, and the fixed validation and test splits. Metadata only
        (name, source, digest): the digest is the data's fingerprint, so equal data shows as one dataset."""
        p, name = planned.point, self.spec.dataset.name
        source = CodeDatasetSource({"fairsweep.dataset": name, "options": json.dumps(dict(self.spec.dataset.options),
                                                                                     sort_keys=True, default=str)})
        finetune = {"split": "finetune", "intervention": p.intervention, "magnitude": p.magnitude, "seed": p.seed,
                    "size": p.finetune_size}
        inputs = []
        for context, ident in (("training", finetune), ("validation", {"split": "val"}), ("testing", {"split": "test"})):
            digest = canonical_hash({"data": self.plan.dataset_fingerprint, **ident}, length=8)
            label = f"{name}:{ident['split']}" + (f":{p.intervention}={p.magnitude:g},seed={p.seed}"
                                                   if ident is finetune else "")
            dataset = MetaDataset(source, name=label, digest=digest)
            inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)]))
        return inputs

    def _inner_search(self) -> bool:
        return any(isinstance(v, (list, tuple)) for v in self.spec.finetune.fixed().values())

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._trial_run(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: Mapping[str, Any], **info: Any) -> None:
        run_id = self._trial_run(trial)
        if run_id in self._done_before:
            return
        pretrain_run = self._note_pretraining(result)
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        final = bool(result.get("done_training"))
        # a trial restarted from a checkpoint older than its last report repeats those epochs: logged once
        new_epoch = step > self._last_step.get(run_id, 0)
        self._last_step[run_id] = max(step, self._last_step.get(run_id, 0))
        metrics = []
        for k, v in _flatten(result).items():
            if (k.split("/", 1)[0] in _NON_METRIC or not isinstance(v, (int, float)) or isinstance(v, bool)
                    or not math.isfinite(v)):  # Tune's own config/..., the inner search's chosen_hparams/...
                continue
            if (k in _PER_EPOCH and new_epoch) or (final and k not in _PER_EPOCH):
                metrics.append(Metric(k, float(v), int(result.get("timestamp", 0)) * 1000, step))
        tags, params = [], []
        if final:  # one write with the metrics: the driver's cost per trial is a few store calls
            self._remember_val_objectives(result)
            tags.append(RunTag(TAGS.FROZEN_GROUPS, str(result.get("frozen_groups", ""))))
            if pretrain_run:  # a trial that started before its base was built did not know its run
                tags.append(RunTag(TAGS.PRETRAIN_RUN, pretrain_run))
            if result.get("infinite_metrics"):
                tags.append(RunTag(TAGS.INFINITE_METRICS, str(result["infinite_metrics"])[:5000]))
            if result.get("feature_cache"):
                tags.append(RunTag(TAGS.FEATURE_CACHE, str(result["feature_cache"])[:500]))
            tags += [RunTag(tag, str(result[k])) for tag, k in ((TAGS.DEVICE, "device"),
                                                                (TAGS.PRECISION, "compute_precision")) if result.get(k)]
            chosen = result.get("chosen_hparams") or {}
            if self._inner_search() and chosen:  # the inner search's pick, known only now
                params = [Param(f"finetune.{k}", repr(float(v))) for k, v in chosen.items()]
            if result.get("preprocessing"):  # folder images: the mean/std/size/crop the backbone was fed
                params.append(Param("preprocessing", str(result["preprocessing"])[:500]))
        for i in range(0, max(len(metrics), 1), 1000):
            if metrics[i:i + 1000] or (i == 0 and (tags or params)):
                self.client.log_batch(run_id, metrics=metrics[i:i + 1000], tags=tags if i == 0 else [],
                                      params=params if i == 0 else [])

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self._trial_run(trial)
        if run_id in self._done_before:
            return
        ckpt = trial.checkpoint
        if ckpt is not None:
            backbone = TrialConfig.from_tune(trial.config).point.backbone
            self._final_checkpoints[run_id] = (backbone, ckpt.path)  # for log_front_models

            with ckpt.as_directory() as d:
                for name in (PREDICTIONS_FILE, VAL_PREDICTIONS_FILE, PER_GROUP_FILE, INNER_SEARCH_FILE):
                    if (Path(d) / name).exists():
                        self.client.log_artifact(run_id, str(Path(d) / name))
                if self.spec.tracking.log_models == "all":
                    self._log_weights(run_id, Path(d))
        if run_id in self._errored:  # a retried trial that failed before: its old error no longer holds
            self.client.delete_tag(run_id, TAGS.ERROR)
            self._errored.discard(run_id)
        self.client.set_terminated(run_id, "FINISHED")
        self._settle(run_id, "FINISHED")
        if time.monotonic() - self._front_at >= FRONT_REFRESH_S:  # at most every few seconds; always at the end
            self.refresh_front(draw=False)
        self._report_progress(trials, just_ended=(trial, "TERMINATED"))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self._trial_run(trial)
        error = self._note_pretraining_failure(trial, _error_text(trial))
        self.client.set_tag(run_id, TAGS.ERROR, error[-4000:])
        self._errored.add(run_id)
        self.client.set_terminated(run_id, "FAILED")
        self._settle(run_id, "FAILED")
        self._report_progress(trials, just_ended=(trial, "ERROR"))

    def _report_progress(self, trials: list, just_ended: tuple[Any, str] | None = None) -> None:
        """At most every FRONT_REFRESH_S: finished / running / failed of the sweep's trials, the front's size
        and an estimate of the time left (``_time_left``)."""
        if self.progress is None or time.monotonic() - self._progress_at < FRONT_REFRESH_S:
            return
        self._progress_at = time.monotonic()
        # Tune calls back before it marks the trial that just ended: count it as it ended
        status = [just_ended[1] if just_ended and t is just_ended[0] else getattr(t, "status", "") for t in trials]
        finished, failed, running = status.count("TERMINATED"), status.count("ERROR"), status.count("RUNNING")
        total = self.spec.n_trials
        ended, elapsed = finished + failed, time.monotonic() - self._started_at
        left = _time_left(self._ended_at, total - ended)
        eta = f", about {left:.0f} s left" if left is not None else ""
        self.progress(f"trials: {finished}/{total} finished, {running} running, {failed} failed; Pareto front: "
                      f"{self._front_size} configurations;{self._val_summary()} {elapsed:.0f} s{eta}")

    def remember_finished(self, finished: list[tuple[TrialConfig, dict]]) -> None:
        """A resumed sweep's earlier finished trials (``finished_trials``) count in the progress line's best."""
        for _, metrics in finished:
            self._remember_val_objectives(metrics)

    def _remember_val_objectives(self, result: Mapping[str, Any]) -> None:
        """Keep each objective's best finished value on validation (the split the sweep's choices are made on;
        the front itself is on test): what Tune's per-trial tables would otherwise be read for. A signed metric's
        best is the one nearest parity."""
        objectives = (self.spec.objectives.performance, self.spec.objectives.fairness)
        values = [result.get(f"val_{m}") for m in objectives]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            return
        if self._val_best is None:
            self._val_best = [float(v) for v in values]
            return
        for i, (metric, value) in enumerate(zip(objectives, values)):
            best = self._val_best[i]
            if _is_signed(metric):
                better = abs(value) < abs(best)
            else:
                better = value > best if _direction(metric) == "max" else value < best
            if better:
                self._val_best[i] = float(value)

    def _val_summary(self) -> str:
        if self._val_best is None:
            return ""
        objectives = (self.spec.objectives.performance, self.spec.objectives.fairness)
        return f" best so far: {', '.join(f'val_{m} {v:.3f}' for m, v in zip(objectives, self._val_best))};"

    # -- bookkeeping for the summary and interruptions --------------------------------------------
    def _trial_runs(self, status: str | None = None) -> list:
        flt = run_filter(sweep=self.spec.name, kind="trial", status=status)
        return list(search_runs(self.client, [self.experiment_id], flt))

    def trial_status_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self._trial_runs():
            counts[r.info.status] = counts.get(r.info.status, 0) + 1
        return counts

    def trial_run_ids(self, status: str) -> list[str]:
        return [r.info.run_id for r in self._trial_runs(status)]

    def mark_in_flight_killed(self, reason: str | None = None) -> int:
        """No trial run stays RUNNING once the driver stops: after an interruption (resume sets them
        running again), or after a finished search for trials a killed driver had started but Tune's
        saved state did not hold (the search replaced them; ``reason`` says so in the error tag)."""
        run_ids = self.trial_run_ids("RUNNING")
        for run_id in run_ids:
            if reason:
                self.client.set_tag(run_id, TAGS.ERROR, reason)
            self.client.set_terminated(run_id, "KILLED")
        return len(run_ids)

    # -- Pareto front ---------------------------------------------------------------------------
    def refresh_front(self, *, draw: bool = True) -> pd.DataFrame:
        """Recompute the front over finished trials (seed means); tag children, log the tables (and with
        ``draw``, the figure) on the parent. During a sweep it runs at most every FRONT_REFRESH_S, without
        the figure, so the driver's cost per trial does not grow with the sweep; the end draws it."""
        self._front_at = time.monotonic()
        perf, fair = self.spec.objectives.performance, self.spec.objectives.fairness
        table = front_table(load_trials(self.client, self.spec.experiment, self.spec.name), perf, fair)
        for _, row in table.iterrows():
            value = "true" if row["on_front"] else "false"
            for run_id in row["run_ids"]:
                if self._front_state.get(run_id) != value:
                    tags = [RunTag(TAGS.FRONT, value)]
                    if run_id in self._run_names:  # front members stand out in the UI's run list
                        mark = FRONT_MARK if value == "true" else ""
                        tags.append(RunTag(TAGS.RUN_NAME, mark + self._run_names[run_id]))
                    self.client.log_batch(run_id, tags=tags)
                    self._front_state[run_id] = value
        if not table.empty:
            self._log_front_artifacts(table, perf, fair, draw)
        self._log_front_progress(table, perf, fair)
        return table

    def log_front_models(self, table: pd.DataFrame) -> list[str]:
        """Each front member's finetuned model as an MLflow model (``runs:/RUN_ID/model``, flavour pytorch),
        so the fairest one loads in one call: ``mlflow.pytorch.load_model("runs:/RUN_ID/model")``. Members
        that finished under this driver (their final checkpoint is at hand); returns the run ids logged.
        The weights are the ones the trial reported: the inner search's and epoch selection's pick."""
        members = [r for ids in (table[table["on_front"]]["run_ids"] if len(table) else []) for r in ids]
        todo = [r for r in members if r in self._final_checkpoints and r not in self._models_logged]
        if not todo or self.spec.tracking.log_models == "none":
            return []
        mlflow_pytorch = _import_mlflow_pytorch()
        from trainables.data import build_dataset

        shape = build_dataset(self.spec.dataset.name, self.spec.dataset.options).input_shape
        once = _OnlyOnce()  # MLflow's warning about pickle holds for the batch, not for each model of it
        logging.getLogger(mlflow_pytorch.__name__).addFilter(once)
        try:
            for run_id in todo:
                backbone, path = self._final_checkpoints[run_id]
                model = backbones.create_backbone(backbone, num_classes=2, input_shape=shape)
                model.load_state_dict(_reported_weights(Path(path)))
                model.eval()
                with tempfile.TemporaryDirectory() as d:
                    # pickle: the whole module object, whatever its forward does (pt2 would trace it on an example)
                    mlflow_pytorch.save_model(model, str(Path(d) / "model"), serialization_format="pickle",
                                              pip_requirements=_model_requirements())
                    self.client.log_artifacts(run_id, str(Path(d) / "model"), artifact_path="model")
                self._models_logged.add(run_id)
        finally:
            logging.getLogger(mlflow_pytorch.__name__).removeFilter(once)
        return todo

    def _log_weights(self, run_id: str, checkpoint: Path) -> None:
        """``tracking.log_models: all``: the trial's finetuned weights (the pick it reported) as the run artifact
        WEIGHTS_ARTIFACT, in safetensors, so they load weights-only anywhere (``fairsweep cka`` reads them)."""
        from safetensors.torch import save_file

        folder, name = WEIGHTS_ARTIFACT.rsplit("/", 1)
        with tempfile.TemporaryDirectory() as d:
            save_file({k: v.contiguous() for k, v in _reported_weights(checkpoint).items()}, str(Path(d) / name))
            self.client.log_artifact(run_id, str(Path(d) / name), artifact_path=folder)

    def _log_front_progress(self, table: pd.DataFrame, perf: str, fair: str) -> None:
        """What the MLflow UI shows on the parent run as the sweep goes: ``front_size``, ``hypervolume`` and
        ``trials_finished``, stepped by finished trials (a chart of the front growing), and the run's
        description (Markdown): the axes, the current front and how to query it."""
        finished = int(table["n_seeds"].sum()) if len(table) else 0
        front = table[table["on_front"]] if len(table) else table
        self._front_size = len(front)
        volume = 0.0
        if len(table):  # reference: the worst each objective can take (no performance, full unfairness)
            volume = pareto_mod.hypervolume(_objective_values(table, [perf, fair]), [_direction(perf), _direction(fair)],
                                            hypervolume_reference(table, perf, fair))
        now = int(time.time() * 1000)
        metrics = [Metric("front_size", float(len(front)), now, finished), Metric("hypervolume", volume, now, finished),
                   Metric("trials_finished", float(finished), now, finished)]
        self.client.log_batch(self.parent_run_id, metrics=metrics,
                              tags=[RunTag(TAGS.NOTE, self._description(front, perf, fair, finished))])

    def _description(self, front: pd.DataFrame, perf: str, fair: str, finished: int) -> str:
        s, name = self.spec, self.spec.name
        axes = s.axes
        lines = [f"**fairsweep sweep `{name}`**: {s.n_trials} trials of {', '.join(axes.backbone)} x "
                 f"{', '.join(axes.paradigm)} x {'; '.join(f'{a.kind} {list(a.endpoints())}' for a in axes.intervention)}"
                 f" x freeze {[str(f) for f in axes.freeze_depth]} x seeds {list(axes.seed)} on `{s.dataset.name}`.",
                 "", f"Pareto front after {finished} finished trials ({perf} max, {fair} min; test split, means over "
                 f"seeds): {len(front)} configurations.", ""]
        if len(front):
            # a signed fairness metric: the front compares its mean |value| over seeds, shown beside the signed mean
            cols = ["paradigm", "intervention.magnitude", "freeze_depth", "n_seeds", perf, fair,
                    *[c for c in abs_columns(fair)[:1] if c in front]]
            lines += ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
            for _, row in front.head(20).iterrows():
                lines.append("| " + " | ".join(f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c])
                                               for c in cols) + " |")
            lines.append("")
        lines += [f"Front members: filter the child runs with `tags.{TAGS.FRONT} = 'true'`. Ask more with "
                  f"`fairsweep pareto {name}`, `fairsweep best {name} --max-drop 0.01`, `fairsweep compare {name} "
                  f"--by paradigm` (choices on the validation split, intervals over seeds)."]
        return "\n".join(lines)

    def _log_front_artifacts(self, table: pd.DataFrame, perf: str, fair: str, draw: bool) -> None:
        with tempfile.TemporaryDirectory() as d:
            front = table[table["on_front"]].drop(columns=["run_ids"])
            front.to_csv(Path(d) / "front.csv", index=False)
            table.drop(columns=["run_ids"]).to_csv(Path(d) / "all_configs.csv", index=False)
            if draw:
                fig = pareto_figure(table, perf, fair, title=f"{self.spec.name}: {len(front)} of {len(table)} on the front")
                fig.savefig(Path(d) / "front.png")
            self.client.log_artifacts(self.parent_run_id, d, artifact_path="pareto")
        self.client.set_tag(self.parent_run_id, TAGS.FRONT_SIZE, str(len(front)))
        self.client.set_tag(self.parent_run_id, TAGS.FRONT_SPLIT, "test")  # descriptive; picks use val


def driver_alive(tag: str | None) -> bool | None:
    """Whether the driver named by a driver tag (``TAGS.DRIVER``) still runs; None when it ran on another
    host (or the tag is missing), where this process cannot tell."""
    host, _, pid = (tag or "").rpartition(":")
    if not host or host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _one_or_list(values: tuple) -> Any:
    """An axis as a parent-run param: its value when it has one (as before it was an axis), else the list."""
    return values[0] if len(values) == 1 else list(values)


def _import_mlflow_pytorch() -> Any:
    """``mlflow.pytorch`` without its optional Lightning checkpoint callback, which it imports with
    pytorch_lightning (installed beside lightly): 2.7 s at the end of a launch, 0.8 s of a tiny launch's wall
    time. The module is blocked only for this import (Python treats None in ``sys.modules`` as a module that
    cannot import); ``mlflow.pytorch.autolog`` imports it itself when asked. A process that imported
    mlflow.pytorch before keeps it as it is."""
    blocker = "mlflow.pytorch._lightning_autolog"
    blocked = blocker not in sys.modules and "mlflow.pytorch" not in sys.modules
    if blocked:
        sys.modules[blocker] = None
    try:
        import mlflow.pytorch
    finally:
        if blocked and sys.modules.get(blocker, False) is None:
            del sys.modules[blocker]
    return mlflow.pytorch


def _model_requirements() -> list[str]:
    """What loading a front model needs, named outright: left to itself, MLflow infers it by loading the model
    in a fresh Python process, about 18 s per model on two cores, which was most of a quickstart's wall time
    (benchmarks/throughput.py). The pickled module refers to torch's, timm's and fairsweep's classes."""
    return [f"{name}=={metadata.version(name)}" for name in ("torch", "timm", "fairsweep")]


def _time_left(ended_at: list[float], remaining: int) -> float | None:
    """Seconds until ``remaining`` more trials end, at the pace trials have been ending (the time between the
    first and the last ending, per ending: all slots together). The time before the first ending (Ray,
    pretraining, worker start-up) says nothing about the rest, so it does not count; None until two ended."""
    if remaining <= 0 or len(ended_at) < 2 or ended_at[-1] <= ended_at[0]:
        return None
    return (ended_at[-1] - ended_at[0]) / (len(ended_at) - 1) * remaining


class _OnlyOnce(logging.Filter):
    """Passes each distinct message once."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def _reported_weights(checkpoint: Path) -> dict:
    """The model state of a trial's final checkpoint that its metrics describe: the inner search's and the
    epoch selection's pick (older checkpoints without an inner search: the last epoch's model)."""
    import torch

    state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    chosen = (state.get("progress") or {}).get("chosen")
    return chosen if chosen is not None else state["model"]


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def _error_text(trial: Any) -> str:
    """The trial's error: Tune writes it to the trial's local error file before calling back, and syncs
    it to storage only later, so the local file comes first."""
    try:
        local = trial.error_file
        if local and Path(local).exists():
            return Path(local).read_text()
        text = trial.get_error()
    except Exception:  # noqa: BLE001 - the error file may be unreadable; the run must still end FAILED
        text = traceback.format_exc()
    return str(text or "trial failed without an error message")
