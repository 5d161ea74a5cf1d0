"""Phase 1 of a sweep, overlapped with phase 2: each pretraining key once, as Ray tasks on the trials'
resources, while Tune already runs the trials.

Why overlapped: a sweep's trials on other bases (or none) need not wait for pretraining, and every trial
worker's start-up (a fresh process importing torch and timm) happens meanwhile. A trial built on a job
still running waits for that job's task (``trainables.finetune.PendingPretraining``) and fails with its
error if it failed. The driver logs each job to MLflow as it ends, from Tune's own loop (the tracker polls
``poll`` at every step), so MLflow is written from one thread only. The jobs' slots are reserved first
(a placement group); when the cluster cannot hold them all at once, phase 1 runs to its end first, as
before (``_reserve`` says why).
"""
from __future__ import annotations

from typing import Any, Callable

from orchestrator.plan import Plan
from trainables.finetune import PendingPretraining
from trainables.plugins import with_plugins  # a plugin's names resolve in every Ray worker too
from trainables.pretrain import run_pretrain_job

__all__ = ["PretrainingPhase", "run_pretraining", "RESERVE_WAIT_S"]

RESERVE_WAIT_S = 5.0  # how long the jobs' slots may take to be reserved before phase 1 runs first, as a whole


class PretrainingPhase:
    """The pretraining jobs of one driver run: submitted at construction, logged as they end."""

    def __init__(self, plan: Plan, cache_root: str, tracker: Any, progress: Callable[[str], None] | None = None,
                 input_cache: str | None = None):
        """``input_cache``: where folder images are decoded (``launch._trial_context``), when resources.input_cache
        is on."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        res = plan.spec.resources
        task = ray.remote(num_cpus=res.cpus_per_trial, num_gpus=res.gpus_per_trial,
                          max_retries=max(1, res.max_failures))(with_plugins(run_pretrain_job, plan.spec.plugins))
        decoded = input_cache if res.input_cache else None
        self._group = _reserve(res, len(plan.pretrain_jobs))
        # the trials may start beside the jobs only when every job has its slot reserved (see _reserve)
        self.overlapped = self._group is not None or not plan.pretrain_jobs
        self._jobs = {}
        for i, job in enumerate(plan.pretrain_jobs):
            where = ({"scheduling_strategy": PlacementGroupSchedulingStrategy(self._group, placement_group_bundle_index=i)}
                     if self._group is not None else {})
            self._jobs[task.options(**where).remote(job.to_dict(), cache_root, res.cpus_per_trial, decoded)] = job
        self._pending = list(self._jobs)
        self._ended = 0
        self._tracker = tracker
        self._progress = progress
        self._sweep = plan.spec.name
        self.failed: dict[str, str] = {}  # key -> the MLflow run id of its FAILED pretrain run
        if progress and self._jobs:
            progress(f"pretraining: {len(self._jobs)} job(s) "
                     f"({', '.join(f'{j.backbone}/{j.paradigm}' for j in plan.pretrain_jobs)})")

    def for_trials(self) -> dict[str, PendingPretraining]:
        """What the trials wait for, by pretraining key (TrialContext.pretraining)."""
        return {job.key: PendingPretraining(ref, f"{job.backbone}/{job.paradigm} (key {job.key})", self._sweep)
                for ref, job in self._jobs.items()}

    def poll(self, timeout: float | None = 0.0) -> None:
        """Log the jobs that have ended (waiting up to ``timeout`` seconds for one; None: for all)."""
        import ray

        if not self._pending:
            return
        done, self._pending = ray.wait(self._pending, num_returns=len(self._pending) if timeout is None else 1,
                                       timeout=timeout, fetch_local=False)
        if done and self._pending:  # and any others that have ended too
            more, self._pending = ray.wait(self._pending, num_returns=len(self._pending), timeout=0, fetch_local=False)
            done += more
        for ref in done:
            self._ended += 1
            self._log(ref)
        if not self._pending:
            self.close()

    def close(self) -> None:
        """Give the reserved slots back (every job has ended, or the sweep stops without them)."""
        if self._group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self._group)
            self._group = None

    def finish(self) -> None:
        """Wait for every job and log it (a job no trial waited for, e.g. on a resume, still ends logged)."""
        self.poll(timeout=None)

    def run_id_of_failure(self, key: str | None) -> str | None:
        """The FAILED pretrain run of ``key``, once its job has ended and been logged (poll first)."""
        self.poll()
        return self.failed.get(key) if key else None

    def _log(self, ref: Any) -> None:
        import ray

        job = self._jobs[ref]
        try:
            outcome = ray.get(ref)
        except ray.exceptions.RayError as exc:  # its own error, a crashed worker, a lost node, out of memory, ...
            self.failed[job.key] = self._tracker.log_pretrain_failure(job, str(exc))
            if self._progress:
                self._progress(f"pretraining {self._ended}/{len(self._jobs)} failed: {job.backbone}/{job.paradigm} "
                               f"(its trials fail; `fairsweep resume {self._sweep} --retry-errored` retries it)")
            return
        self._tracker.log_pretrain(job, outcome)
        if self._progress:
            how = ("from the cache" if outcome.reused else
                   f"{len(outcome.losses)} epochs, last loss {outcome.losses[-1]:.4f}" if outcome.losses else "built")
            self._progress(f"pretraining {self._ended}/{len(self._jobs)} done: {job.backbone}/{job.paradigm} ({how}, "
                           f"{outcome.seconds:.0f} s)")


def _reserve(res: Any, jobs: int) -> Any:
    """A placement group with one trial-sized slot per job, or None when the cluster cannot hold them all
    within RESERVE_WAIT_S. Why: a trial waits for its base on its own slot, so a job that had no slot (or lost
    it: a retry after its worker crashed) while waiting trials held every slot would never run. A reserved
    slot stays the job's, retries included, until the phase ends."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundle = {k: v for k, v in (("CPU", res.cpus_per_trial), ("GPU", res.gpus_per_trial)) if v > 0}
    if not jobs or not bundle:
        return None
    free = ray.available_resources()
    if any(free.get(k, 0.0) + 1e-9 < v * jobs for k, v in bundle.items()):
        return None  # not even in all: no need to wait for a reservation that cannot be made
    group = placement_group([dict(bundle) for _ in range(jobs)], strategy="PACK")
    ready, _ = ray.wait([group.ready()], timeout=RESERVE_WAIT_S)
    if ready:
        return group
    remove_placement_group(group)
    return None


def run_pretraining(plan: Plan, cache_root: str, tracker: Any, progress: Callable[[str], None] | None = None,
                    input_cache: str | None = None) -> dict[str, str]:
    """Phase 1 alone, to its end (benchmarks/pretrain_sharing.py): returns {key: MLflow run id} of the jobs
    that failed."""
    phase = PretrainingPhase(plan, cache_root, tracker, progress, input_cache)
    phase.finish()
    return phase.failed
