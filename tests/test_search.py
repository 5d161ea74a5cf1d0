"""The optuna search: spec section, reproducible proposals, exact budget, no configuration twice."""
from __future__ import annotations

import pytest

from orchestrator.plan import build_plan
from orchestrator.search import StudySearcher
from orchestrator.spec import Range, SpecError, parse_spec
from tests.helpers import tiny_spec

OPTUNA = {"type": "optuna", "sampler": "tpe", "budget": 6, "seed": 0}
RANGES = {"axes.intervention": {"kind": "correlation", "magnitudes": {"low": 0.5, "high": 0.95}},
          "finetune.lr": {"low": 1.0e-3, "high": 1.0e-1, "log": True}}


def _plan(**overrides):
    return build_plan(parse_spec(tiny_spec(**{"search": dict(OPTUNA), **RANGES, **overrides})))


def test_spec_accepts_ranges_and_sampler():
    spec = parse_spec(tiny_spec(**{"search": dict(OPTUNA), **RANGES}))
    assert spec.search.sampler == "tpe" and spec.search.budget == 6 and spec.n_trials == 6
    assert spec.axes.intervention[0].magnitudes == Range(0.5, 0.95)
    assert spec.finetune.lr == Range(1e-3, 1e-1, log=True)
    assert "lr" not in spec.finetune.fixed() and "size" not in spec.finetune.fixed() and spec.axes.finetune_size == (200,)


@pytest.mark.parametrize("overrides, path, fragment", [
    ({"axes.intervention": {"kind": "correlation", "magnitudes": {"low": 0.5, "high": 0.9}}},
     "axes.intervention[0].magnitudes", "search type optuna"),
    ({"finetune.lr": {"low": 0.001, "high": 0.1}}, "finetune.lr", "search type optuna"),
    ({"search": {"type": "optuna"}}, "search.budget", "needs a budget"),
    ({"search": {"type": "optuna", "budget": 4, "sampler": "cmaes"}}, "search.sampler", "tpe, nsga2, random"),
    ({"search": {"type": "grid", "budget": 4}}, "search.budget", "only used with type: optuna"),
    ({"search": {"type": "optuna", "budget": 9}}, "search.budget", "only 8 distinct configurations"),
    ({"search": dict(OPTUNA), "axes.intervention": {"kind": "correlation", "magnitudes": {"low": 0.9, "high": 0.5}}},
     "axes.intervention.magnitudes.high", "greater than low"),
    ({"search": dict(OPTUNA), "finetune.lr": {"low": 0, "high": 0.1, "log": True}}, "finetune.lr.low", "log range"),
])
def test_search_errors_name_the_field(overrides, path, fragment):
    with pytest.raises(SpecError) as info:
        parse_spec(tiny_spec(**overrides))
    assert info.value.path.startswith(path)
    assert fragment in str(info.value)


def test_range_under_grid_says_what_to_do():
    with pytest.raises(SpecError, match="a range needs search type optuna; under a grid list the values"):
        parse_spec(tiny_spec(**{"axes.intervention": {"kind": "correlation", "magnitudes": {"low": 0.5, "high": 0.9}}}))


def _propose(plan, journal, n):
    searcher = StudySearcher(plan, str(journal), study_name="s")
    return [searcher.suggest(f"t{i}")["trial"]["point"] for i in range(n)], searcher


@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "random"])
def test_same_spec_and_seed_propose_the_same_first_configurations(tmp_path, sampler):
    plan = _plan(**{"search": {**OPTUNA, "sampler": sampler}})
    first, _ = _propose(plan, tmp_path / "a.journal", 4)
    again, _ = _propose(plan, tmp_path / "b.journal", 4)
    assert first == again
    other, _ = _propose(_plan(**{"search": {**OPTUNA, "sampler": sampler, "seed": 1}}), tmp_path / "c.journal", 4)
    assert other != first
    assert all(0.5 <= p["magnitude"] <= 0.95 and 1e-3 <= p["searched"]["lr"] <= 1e-1 for p in first)


def test_the_finetuning_size_is_searched_only_when_the_axis_has_several(tmp_path):
    from ray.tune.search import Searcher

    from trainables.trial import Freeze, TrialConfig

    spec = tiny_spec(**{"search": {"type": "optuna", "sampler": "random", "budget": 16, "seed": 0},
                        "axes.finetune_size": [64, 128], "axes.freeze_depth": [[1, 0], "linear"]})
    del spec["finetune"]["size"]
    plan = build_plan(parse_spec(spec))  # 16 cells: every one is proposed once
    searcher = StudySearcher(plan, str(tmp_path / "sizes.journal"), study_name="s")
    seen, i = set(), 0
    while (config := searcher.suggest(f"t{i}")) != Searcher.FINISHED:
        trial = TrialConfig.from_tune(config)  # what the worker decodes
        assert plan.trial_for(config).config == trial
        seen.add((trial.point.finetune_size, trial.point.freeze_depth))
        searcher.on_trial_complete(f"t{i}", {"val_accuracy": 0.6, "val_equalized_odds_difference": 0.1})
        i += 1
    assert seen == {(n, f) for n in (64, 128) for f in (Freeze((0, 1)), Freeze("linear"))}
    assert {t.params["finetune_size"] for t in searcher.study.trials} == {64, 128}
    assert {t.params["freeze_depth"] for t in searcher.study.trials} == {"[0,1]", "linear"}  # Freeze labels
    one = StudySearcher(_plan(), str(tmp_path / "one.journal"), study_name="s")
    assert one.suggest("t0") and "finetune_size" not in one.study.trials[0].params  # no choice, no parameter


@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "random"])
def test_budget_counts_finished_trials_and_failures_are_replaced(tmp_path, sampler):
    from ray.tune.search import Searcher

    plan = _plan(**{"search": {**OPTUNA, "sampler": sampler}, "resources.max_concurrent_trials": 2})
    searcher = StudySearcher(plan, str(tmp_path / "s.journal"), study_name="s")
    finished, failed, i = 0, 0, 0
    while True:
        config = searcher.suggest(f"t{i}")
        if config == Searcher.FINISHED:
            break
        assert config is not None  # one at a time here: never "wait"
        if i % 3 == 1:  # every third trial fails
            searcher.on_trial_complete(f"t{i}", None, error=True)
            failed += 1
        else:
            searcher.on_trial_complete(f"t{i}", {"val_accuracy": 0.5 + 0.01 * i, "val_equalized_odds_difference": 0.3 - 0.01 * i})
            finished += 1
        i += 1
    assert finished == searcher.finished() == 6
    assert failed == searcher.failed() >= 2


def test_in_flight_trials_hold_the_budget_until_they_fail(tmp_path):
    plan = _plan(**{"search": {**OPTUNA, "budget": 2}})
    searcher = StudySearcher(plan, str(tmp_path / "s.journal"), study_name="s")
    assert searcher.suggest("a") and searcher.suggest("b")
    assert searcher.suggest("c") is None  # budget covered by trials in flight
    searcher.on_trial_complete("a", None, error=True)
    assert searcher.suggest("c") is not None  # the failure is replaced


def test_no_configuration_runs_twice_in_a_categorical_space(tmp_path):
    from ray.tune.search import Searcher

    spec = tiny_spec(**{"search": {"type": "optuna", "sampler": "tpe", "budget": 8, "seed": 0}})  # 8 cells, budget 8
    plan = build_plan(parse_spec(spec))
    searcher = StudySearcher(plan, str(tmp_path / "s.journal"), study_name="s")
    keys, i = [], 0
    while (config := searcher.suggest(f"t{i}")) != Searcher.FINISHED:
        keys.append(plan.trial_for(config).key)
        searcher.on_trial_complete(f"t{i}", {"val_accuracy": 0.6, "val_equalized_odds_difference": 0.1})
        i += 1
    assert len(keys) == len(set(keys)) == 8


def test_a_restored_searcher_continues_the_same_study(tmp_path):
    import pickle

    plan = _plan()
    journal = tmp_path / "s.journal"
    searcher = StudySearcher(plan, str(journal), study_name="s")
    for i in range(3):
        searcher.suggest(f"t{i}")
    searcher.on_trial_complete("t0", {"val_accuracy": 0.7, "val_equalized_odds_difference": 0.2})
    searcher.save(str(tmp_path / "state.json"))  # Tune's last save: t1, t2 in flight
    searcher.suggest("t3")  # asked after the last save, then the driver dies
    restored = pickle.loads(pickle.dumps(searcher))
    restored.restore(str(tmp_path / "state.json"))
    assert restored.finished() == 1
    states = sorted(t.state.name for t in restored.study.trials)
    assert states == ["COMPLETE", "FAIL", "RUNNING", "RUNNING"]  # t3 was orphaned: failed, never counted
    restored.on_trial_complete("t1", {"val_accuracy": 0.6, "val_equalized_odds_difference": 0.1})
    assert restored.finished() == 2


def _tune_state(folder, **statuses):
    """An experiment state file as Tune writes it (TuneController.save_to_dir): its trials' JSON states."""
    import json

    from ray.tune.experiment import Trial

    trials = []
    for trial_id, status in statuses.items():
        trial = Trial("finetune_trial", stub=True, trial_id=trial_id)
        trial.set_status(status)
        trials.append(trial.get_json_state())
    (folder / "experiment_state-2026-11-30_00-00-00.json").write_text(json.dumps({"trial_data": trials}))


def test_a_trial_tune_resumes_but_the_searchers_state_lacks_is_live_not_orphaned(tmp_path):
    """Tune writes its trials' state, then the searcher's: a driver killed between the two leaves a trial
    that Tune resumes (and runs to the end) but the searcher's saved state does not list. It must count when
    it finishes, or the search runs one trial more than its budget."""
    import pickle

    plan = _plan()
    searcher = StudySearcher(plan, str(tmp_path / "s.journal"), study_name="s")
    searcher.suggest("t0")
    searcher.suggest("t1")
    searcher.on_trial_complete("t0", {"val_accuracy": 0.7, "val_equalized_odds_difference": 0.2})
    searcher.save(str(tmp_path / "searcher-state.json"))  # the searcher's last save: t1 in flight
    searcher.suggest("t2")
    searcher.suggest("t3")
    # Tune's last trial state, written after t2 was asked; the driver died before the searcher's was:
    # t2 is resumed by Tune, t3 (asked after both) is a true orphan
    _tune_state(tmp_path, t0="TERMINATED", t1="RUNNING", t2="PENDING")
    (tmp_path / "experiment_state-2026-11-29_00-00-00.json").write_text("{}")  # an older session's: not read
    restored = pickle.loads(pickle.dumps(searcher))
    restored.restore(str(tmp_path / "searcher-state.json"))
    states = {t.user_attrs["tune_trial_id"]: t.state.name for t in restored.study.trials}
    assert states == {"t0": "COMPLETE", "t1": "RUNNING", "t2": "RUNNING", "t3": "FAIL"}
    restored.on_trial_complete("t2", {"val_accuracy": 0.6, "val_equalized_odds_difference": 0.1})
    assert restored.finished() == 2  # t2 counted


def test_without_tune_state_beside_it_the_searcher_trusts_its_own(tmp_path):
    from orchestrator.search import _unfinished_tune_trials

    assert _unfinished_tune_trials(str(tmp_path)) is None
    assert _unfinished_tune_trials(str(tmp_path / "absent")) is None
    (tmp_path / "experiment_state-2026-11-30_00-00-00.json").write_text('{"trial_data": [')  # cut short
    assert _unfinished_tune_trials(str(tmp_path)) is None
    _tune_state(tmp_path, a="PENDING", b="PAUSED", c="ERROR", d="TERMINATED", e="RUNNING")
    assert _unfinished_tune_trials(str(tmp_path)) == {"a", "b", "e"}


def test_the_optuna_example_plans_with_ranges_and_a_budget():
    from orchestrator.spec import load_spec
    from tests.helpers import REPO

    plan = build_plan(load_spec(REPO / "sweeps" / "optuna.yaml"))
    s = plan.spec
    assert s.search.type == "optuna" and s.search.sampler == "tpe" and s.n_trials == s.search.budget == 24
    assert isinstance(s.axes.intervention[0].magnitudes, Range) and isinstance(s.finetune.lr, Range)


@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "random"])
def test_search_benchmark_keeps_the_budget_and_stays_under_the_grids_hypervolume(tmp_path, sampler):
    """benchmarks/search_vs_grid.py: failed stand-in trials are replaced (exactly budget finish), and
    what a search finds never dominates more than the full grid's front over the same space."""
    import importlib.util

    from orchestrator.pareto import hypervolume
    from orchestrator.plan import grid_points
    from tests.helpers import REPO

    spec_ = importlib.util.spec_from_file_location("search_vs_grid", REPO / "benchmarks" / "search_vs_grid.py")
    bench = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(bench)
    values, finished, failed = bench.run_sampler(sampler, 8, 0, 0.3, tmp_path)
    assert finished == len(values) == 8 and failed >= 1
    grid_plan = bench._plan({"type": "grid"})
    grid = [bench.stand_in(grid_plan, p) for p in grid_points(grid_plan.spec)]
    reference = (min(a for a, _ in grid) - 0.01, max(u for _, u in grid) + 0.01)
    assert 0 < hypervolume(values, bench.DIRECTIONS, reference) <= hypervolume(grid, bench.DIRECTIONS, reference)


def test_a_failed_configuration_is_not_run_again(tmp_path):
    from ray.tune.search import Searcher

    spec = tiny_spec(**{"search": {"type": "optuna", "sampler": "tpe", "budget": 4, "seed": 0}})  # 8 cells
    plan = build_plan(parse_spec(spec))
    searcher = StudySearcher(plan, str(tmp_path / "s.journal"), study_name="s")
    ran, i = [], 0
    while (config := searcher.suggest(f"t{i}")) != Searcher.FINISHED:
        ran.append(plan.trial_for(config).key)
        if config["trial"]["point"]["paradigm"] == "supervised":  # these 4 cells always fail
            searcher.on_trial_complete(f"t{i}", None, error=True)
        else:
            searcher.on_trial_complete(f"t{i}", {"val_accuracy": 0.6, "val_equalized_odds_difference": 0.1})
        i += 1
    assert len(ran) == len(set(ran))  # nothing ran twice, failed configurations included
    assert searcher.finished() == 4 and searcher.failed() <= 4


def test_an_orphaned_configuration_may_run_again_but_a_failed_one_may_not(tmp_path):
    import pickle

    plan = _plan()
    searcher = StudySearcher(plan, str(tmp_path / "s.journal"), study_name="s")
    searcher.suggest("t0")
    searcher.suggest("t1")
    searcher.on_trial_complete("t0", None, error=True)  # a real failure
    searcher.save(str(tmp_path / "state.json"))
    searcher.suggest("t2")  # asked after the last save, then the driver dies: an orphan
    restored = pickle.loads(pickle.dumps(searcher))
    restored.restore(str(tmp_path / "state.json"))
    keys = {t.user_attrs["tune_trial_id"]: t.user_attrs["trial_key"] for t in restored.study.trials}
    assert restored._twin(keys["t0"]) is not None  # failed: not run again
    assert restored._twin(keys["t2"]) is None  # orphaned by the driver's death: may run
    assert restored._twin(keys["t1"]) is not None  # still in flight


def test_the_study_is_told_validation_objectives_never_test_ones(tmp_path):
    """Choosing on the test split would bias every pick: the study sees val_ values only, a trial that
    reports no validation objectives counts as failed, and a signed metric enters as its distance from 0."""
    plan = _plan(**{"search": {**OPTUNA, "budget": 3}})
    searcher = StudySearcher(plan, str(tmp_path / "s.journal"), study_name="s")
    searcher.suggest("t0")
    searcher.on_trial_complete("t0", {"accuracy": 0.99, "equalized_odds_difference": 0.01,
                                      "val_accuracy": 0.71, "val_equalized_odds_difference": 0.23})
    searcher.suggest("t1")
    searcher.on_trial_complete("t1", {"accuracy": 0.99, "equalized_odds_difference": 0.01})  # test metrics only
    states = [(t.state.name, t.values) for t in searcher.study.trials]
    assert states == [("COMPLETE", [0.71, 0.23]), ("FAIL", None)]

    from orchestrator.search import search_values
    from orchestrator.spec import Objectives

    signed = Objectives(performance="auroc", fairness="tpr_difference")
    assert search_values(signed, {"val_auroc": 0.8, "val_tpr_difference": -0.3, "tpr_difference": 0.0}) == [0.8, 0.3]


def test_an_infinite_validation_objective_reaches_the_study_as_infinite_not_as_a_failure():
    """A parity deviation against a zero privileged rate is +inf: left out of the report (MLflow cannot hold it)
    but named in infinite_metrics, so the study is told the worst value instead of failing a finished trial."""
    from orchestrator.search import search_values
    from orchestrator.spec import Objectives

    obj = Objectives(performance="accuracy", fairness="fdr_ratio_deviation")
    got = search_values(obj, {"val_accuracy": 0.8, "infinite_metrics": "fdr_ratio_deviation,val_fdr_ratio_deviation"})
    assert got == [0.8, float("inf")]
    assert search_values(obj, {"val_accuracy": 0.8}) is None  # missing for another reason: a failure


def test_the_searcher_limits_concurrency_itself_so_tunes_wrapper_never_drops_a_completion(tmp_path):
    """Tune wraps a searcher in a ConcurrencyLimiter for max_concurrent_trials unless the searcher limits
    concurrency itself; the wrapper's own list of live trials, saved apart, drops completions it lacks."""
    from ray.tune.search import ConcurrencyLimiter

    searcher = StudySearcher(_plan(), str(tmp_path / "s.journal"), study_name="s", max_concurrent=2)
    limiter = ConcurrencyLimiter(searcher, max_concurrent=2)  # were it wrapped anyway: everything passes through
    assert limiter._limit_concurrency is False and searcher.max_concurrent == 2
    assert limiter.suggest("t0") and limiter.suggest("t1") and limiter.suggest("t2") is None  # two at a time
    limiter.on_trial_complete("t0", {"val_accuracy": 0.7, "val_equalized_odds_difference": 0.2})
    assert searcher.finished() == 1 and limiter.suggest("t3")


def test_a_restore_drops_live_entries_that_will_never_report(tmp_path):
    """The searcher's saved live set can be newer or older than Tune's trials: an entry already told, or one
    Tune does not resume, would hold the budget or the concurrency cap for ever and stall the search."""
    import pickle

    searcher = StudySearcher(_plan(), str(tmp_path / "s.journal"), study_name="s", max_concurrent=3)
    for i in range(3):
        searcher.suggest(f"t{i}")
    searcher.save(str(tmp_path / "searcher-state.json"))  # t0, t1, t2 live
    searcher.on_trial_complete("t0", {"val_accuracy": 0.7, "val_equalized_odds_difference": 0.2})  # told, unsaved
    _tune_state(tmp_path, t0="TERMINATED", t1="RUNNING")  # t2 is not in Tune's state: it never runs again
    restored = pickle.loads(pickle.dumps(searcher))
    restored.restore(str(tmp_path / "searcher-state.json"))
    assert restored.suggest("t3") is not None  # the cap of 3 is not held by t0 and t2
    assert set(restored._live) == {"t1", "t3"}
    states = {t.user_attrs["tune_trial_id"]: t.state.name for t in restored.study.trials}
    assert states == {"t0": "COMPLETE", "t1": "RUNNING", "t2": "FAIL", "t3": "RUNNING"}
    assert restored.finished() == 1


def test_a_resumed_trial_that_completes_before_anything_else_is_asked_still_counts(tmp_path):
    import pickle

    searcher = StudySearcher(_plan(), str(tmp_path / "s.journal"), study_name="s")
    searcher.suggest("t0")
    searcher.save(str(tmp_path / "searcher-state.json"))  # before t1 was asked
    searcher.suggest("t1")
    _tune_state(tmp_path, t0="RUNNING", t1="RUNNING")
    restored = pickle.loads(pickle.dumps(searcher))
    restored.restore(str(tmp_path / "searcher-state.json"))
    restored.on_trial_complete("t1", {"val_accuracy": 0.6, "val_equalized_odds_difference": 0.1})  # the first call
    assert restored.finished() == 1 and set(restored._live) == {"t0"}


def test_on_resume_the_cap_moves_from_tunes_wrapper_into_the_searcher(tmp_path):
    """A sweep launched before the searcher held its cap had Tune wrap it in a ConcurrencyLimiter, whose
    restored state would drop completions again: resume gives the cap to the searcher and none to Tune."""
    from ray import tune

    from orchestrator.launch import _searcher_holds_the_cap

    old = tune.TuneConfig(search_alg=StudySearcher(_plan(), str(tmp_path / "a"), study_name="s"), max_concurrent_trials=2)
    _searcher_holds_the_cap(old, None)
    assert old.max_concurrent_trials is None and old.search_alg.max_concurrent == 2
    new = tune.TuneConfig(search_alg=StudySearcher(_plan(), str(tmp_path / "b"), study_name="s", max_concurrent=2))
    _searcher_holds_the_cap(new, 3)  # --max-concurrent 3 on resume
    assert new.max_concurrent_trials is None and new.search_alg.max_concurrent == 3
    grid = tune.TuneConfig(max_concurrent_trials=2)
    _searcher_holds_the_cap(grid, 3)
    assert grid.max_concurrent_trials == 2  # a grid sweep is left as it was


def test_a_space_used_up_by_failures_ends_the_search_with_its_reason(tmp_path):
    """Budget 8 of 8 cells and one cell fails: no new configuration is left, so the search ends (no
    exception after the sampler's duplicate draws) and records why, which the launch reads as "over",
    not "interrupted"."""
    from ray.tune.search import Searcher

    spec = tiny_spec(**{"search": {"type": "optuna", "sampler": "tpe", "budget": 8, "seed": 0}})  # 8 cells
    plan = build_plan(parse_spec(spec))
    searcher = StudySearcher(plan, str(tmp_path / "s.journal"), study_name="s")
    assert searcher.ended() is None  # no study yet
    keys, i = [], 0
    while (config := searcher.suggest(f"t{i}")) != Searcher.FINISHED:
        assert config is not None
        keys.append(plan.trial_for(config).key)
        if i == 0:
            searcher.on_trial_complete(f"t{i}", None, error=True)
        else:
            searcher.on_trial_complete(f"t{i}", {"val_accuracy": 0.6, "val_equalized_odds_difference": 0.1})
        i += 1
    assert len(keys) == len(set(keys)) == 8
    assert searcher.finished() == 7 and searcher.failed() == 1
    assert "every one of the space's 8 configurations has run, runs or failed" in searcher.ended()


def test_a_used_up_space_ends_the_search_while_its_last_trials_still_run(tmp_path):
    """Tune runs the trials in flight to their end after the searcher finished (a stop meanwhile is an
    interruption: the launch reads Tune's unfinished trials), so the searcher never waits on them."""
    from ray.tune.search import Searcher

    spec = tiny_spec(**{"search": {"type": "optuna", "sampler": "random", "budget": 8, "seed": 0}})
    plan = build_plan(parse_spec(spec))
    searcher = StudySearcher(plan, str(tmp_path / "s.journal"), study_name="s")
    for i in range(7):
        searcher.suggest(f"t{i}")
        searcher.on_trial_complete(f"t{i}", None if i == 0 else {"val_accuracy": 0.6,
                                                                 "val_equalized_odds_difference": 0.1},
                                   error=i == 0)
    assert searcher.suggest("t7") is not None  # the last unseen cell
    assert searcher.suggest("t8") == Searcher.FINISHED and "has run, runs or failed" in searcher.ended()
    searcher.on_trial_complete("t7", {"val_accuracy": 0.6, "val_equalized_odds_difference": 0.1})
    assert searcher.finished() == 7  # t7 still counts


def test_trials_without_objective_values_end_the_search_as_failures(tmp_path):
    """A trial that finished without a validation objective (undefined: NaN is not reported) is a failure to the
    study; past max(budget, 10) of them the search ends and says so."""
    from ray.tune.search import Searcher

    plan = _plan(**{"search": {**OPTUNA, "budget": 3}})
    searcher = StudySearcher(plan, str(tmp_path / "s.journal"), study_name="s")
    i = 0
    while searcher.suggest(f"t{i}") != Searcher.FINISHED:
        searcher.on_trial_complete(f"t{i}", {"val_accuracy": 0.6})  # no val_equalized_odds_difference
        i += 1
    assert i == 10 and searcher.finished() == 0
    assert "10 trials failed or gave the search no objective values" in searcher.ended()


def test_a_search_ended_by_failures_does_not_wait_for_its_trials_in_flight(tmp_path):
    from ray.tune.search import Searcher

    plan = _plan(**{"search": {**OPTUNA, "budget": 3}, "resources.max_concurrent_trials": 2})
    searcher = StudySearcher(plan, str(tmp_path / "s.journal"), study_name="s")
    for i in range(9):
        searcher.suggest(f"f{i}")
        searcher.on_trial_complete(f"f{i}", None, error=True)
    assert searcher.suggest("a") is not None and searcher.suggest("b") is not None
    searcher.on_trial_complete("a", None, error=True)  # the tenth failure, while b runs
    assert searcher.suggest("c") == Searcher.FINISHED and "10 trials failed" in searcher.ended()
    searcher.on_trial_complete("b", {"val_accuracy": 0.6, "val_equalized_odds_difference": 0.1})
    assert searcher.finished() == 1


def test_a_restored_search_that_had_ended_keeps_why(tmp_path):
    """Tune restores its search generator as finished and never asks it again: the reason recorded must stay,
    or a resume (--retry-errored) of a finished search would read as interrupted for ever."""
    import pickle

    from ray.tune.search import Searcher

    plan = _plan(**{"search": {**OPTUNA, "budget": 1}})
    searcher = StudySearcher(plan, str(tmp_path / "s.journal"), study_name="s")
    searcher.suggest("t0")
    searcher.on_trial_complete("t0", {"val_accuracy": 0.6, "val_equalized_odds_difference": 0.1})
    assert searcher.suggest("t1") == Searcher.FINISHED and "budget of 1" in searcher.ended()
    searcher.save(str(tmp_path / "state.json"))
    restored = pickle.loads(pickle.dumps(searcher))
    restored.restore(str(tmp_path / "state.json"))
    restored.on_trial_complete("t9", None, error=True)  # a retried trial's report reopens the study
    assert "budget of 1" in restored.ended()


@pytest.mark.parametrize("url", ["sqlite:///study.db", "sqlite+pysqlite:///study.db", "sqlite+pysqlite:///~/study.db"])
def test_a_relative_sqlite_study_url_is_made_absolute_with_or_without_a_driver(tmp_path, url):
    import os

    from orchestrator.search import resolve_storage_url

    resolved = resolve_storage_url(url, base_dir=str(tmp_path))
    prefix = url.split(":///")[0] + ":///"
    assert resolved.startswith(prefix + "/")
    expected = os.path.expanduser("~/study.db") if "~" in url else str(tmp_path / "study.db")
    assert resolved == prefix + expected
    assert resolve_storage_url(resolved, base_dir="/elsewhere") == resolved  # absolute stays
    assert resolve_storage_url("postgresql://u@h/db") == "postgresql://u@h/db"
