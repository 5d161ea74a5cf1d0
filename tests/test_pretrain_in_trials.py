"""The trials build their pretrained bases: the first trial of each base starts first, and a base that failed
to build in one run of a sweep fails its later trials at once with that error, while the next run builds again."""
from __future__ import annotations

import multiprocessing
import os

import pytest

from orchestrator.plan import build_plan
from orchestrator.spec import parse_spec
from trainables import pretrain
from trainables.pretrain import PretrainingFailedError, run_pretrain_job
from trainables.pretrain_cache import PretrainCache
from tests.helpers import tiny_spec


def _plan(**overrides):
    return build_plan(parse_spec(tiny_spec(**{"axes.freeze_depth": [0], "axes.seed": [0, 1], **overrides})))


def test_the_first_trial_of_each_base_starts_first_and_no_trial_is_lost():
    plan = _plan(**{"axes.paradigm": ["scratch", "supervised", "biased"]})
    order = plan.run_order()
    jobs = [j.key for j in plan.pretrain_jobs]
    assert len(jobs) == 2
    # the two builders lead, in the grid's order; everything else follows in the grid's order
    firsts = [next(t for t in plan.trials if t.config.weights.key == key) for key in jobs]
    assert order[:2] == sorted(firsts, key=plan.trials.index)
    assert order[2:] == [t for t in plan.trials if t not in firsts]
    assert sorted(t.key for t in order) == sorted(t.key for t in plan.trials)


def test_a_grid_without_pretraining_keeps_its_order():
    plan = _plan(**{"axes.paradigm": ["scratch"]})
    assert plan.run_order() == list(plan.trials)


def test_a_failed_build_fails_the_later_calls_of_its_run_at_once_and_another_run_builds_again(tmp_path, monkeypatch):
    (job,) = _plan(**{"axes.paradigm": ["supervised"]}).pretrain_jobs
    builds = []

    def failing_build(job, cache, *args):
        builds.append(job.key)
        raise FloatingPointError("loss became nan at epoch 1")

    monkeypatch.setattr(pretrain, "_build", failing_build)
    cache = str(tmp_path / "cache")
    with pytest.raises(PretrainingFailedError) as first:
        run_pretrain_job(job.to_dict(), cache, driver_run="run-a")
    message = str(first.value)
    assert f"pretraining {job.backbone}/{job.paradigm} (key {job.key}) failed" in message
    assert "FloatingPointError: loss became nan at epoch 1" in message
    assert isinstance(first.value.__cause__, FloatingPointError)  # the build's own traceback stays attached

    # the other trials of that base in the same run: the same error, without building again
    with pytest.raises(PretrainingFailedError) as again:
        run_pretrain_job(job.to_dict(), cache, driver_run="run-a")
    assert str(again.value) == message and builds == [job.key]
    assert PretrainCache(cache).recorded_failure(job.key, "run-a") == message
    assert PretrainCache(cache).entries() == []  # a failure is no cache entry

    # another run of the sweep (a resume) builds again
    with pytest.raises(PretrainingFailedError):
        run_pretrain_job(job.to_dict(), cache, driver_run="run-b")
    assert builds == [job.key, job.key]

    # without a run (a direct call: tests, benchmarks) the build's own error propagates, and nothing is recorded
    with pytest.raises(FloatingPointError):
        run_pretrain_job(job.to_dict(), str(tmp_path / "other"))
    assert PretrainCache(tmp_path / "other").recorded_failure(job.key, "run-a") is None


def test_an_entry_says_which_run_built_it(tmp_path):
    (job,) = _plan(**{"axes.paradigm": ["supervised"], "pretraining.epochs": 1}).pretrain_jobs
    built = run_pretrain_job(job.to_dict(), str(tmp_path / "cache"), driver_run="run-a")
    assert not built.reused and built.meta["built_in_run"] == "run-a"
    found = run_pretrain_job(job.to_dict(), str(tmp_path / "cache"), driver_run="run-b")
    assert found.reused and found.meta["built_in_run"] == "run-a"  # the driver of run-b reads it as found, not built


def _die(*args):
    os._exit(3)  # the worker killed mid-build: no exception, no failure recorded, the key's lock released


def test_a_build_whose_worker_died_is_tried_once_more_then_fails_its_base(tmp_path, monkeypatch):
    """A build that kills its worker (out of memory) leaves no entry and no failure; the next trial of that base
    builds again, as the Ray task's retry did; after MAX_BUILDS_PER_RUN deaths the base fails with a reason."""
    (job,) = _plan(**{"axes.paradigm": ["supervised"]}).pretrain_jobs
    cache = str(tmp_path / "cache")
    monkeypatch.setattr(PretrainCache, "_sweep_leftovers", _die)  # the first step of a build once it is counted
    for _ in range(pretrain.MAX_BUILDS_PER_RUN):
        child = multiprocessing.get_context("fork").Process(target=run_pretrain_job, args=(job.to_dict(), cache),
                                                              kwargs={"driver_run": "run-a"})
        child.start()
        child.join(60)
        assert child.exitcode == 3
    with pytest.raises(PretrainingFailedError, match=r"its worker died during 2 builds in this run"):
        run_pretrain_job(job.to_dict(), cache, driver_run="run-a")
    with pytest.raises(PretrainingFailedError, match=r"died during 2 builds"):  # recorded: the next trials alike
        run_pretrain_job(job.to_dict(), cache, driver_run="run-a")
    assert PretrainCache(cache).entries() == []
