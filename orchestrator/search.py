"""Multi-objective search with Optuna, as a Ray Tune searcher.

Optuna's samplers (TPE, NSGA-II, random) propose points of the sweep's space; Tune runs them. The
study lives in a journal file beside the sweep's Tune state, written at every ask and tell, so a
driver killed at any moment resumes the same study: the sampler continues from everything it was
told, and no configuration runs twice. This is a thin adapter over Optuna's ask/tell rather than
Ray's ``OptunaSearch`` because the budget counts *finished* trials (a failed trial is reported and
replaced, never counted) and because the study must outlive a pickled searcher.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

from ray.tune.search import Searcher

from orchestrator.plan import Plan, TrialPoint
from orchestrator.spec import Range, freeze_label

__all__ = ["StudySearcher", "make_sampler", "suggest_point", "search_values", "STUDY_FILE"]

STUDY_FILE = "optuna_study.journal"
_KEY_ATTR, _TWIN_ATTR, _ORPHAN_ATTR = "trial_key", "duplicate_of", "orphaned"
_MAX_DUPLICATE_DRAWS = 50
_ENQUEUE_AFTER = 10  # duplicate draws in a row before a categorical space's unseen cell is enqueued


def make_sampler(name: str, seed: int) -> Any:
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler {name!r}; use tpe, nsga2 or random")


def suggest_point(trial: Any, plan: Plan) -> TrialPoint:
    """Define-by-run: one point of the sweep's space. Lists are categorical, ranges continuous; each
    intervention kind has its own magnitude parameter, since their ranges differ."""
    a = plan.spec.axes
    backbone = trial.suggest_categorical("backbone", list(a.backbone))
    paradigm = trial.suggest_categorical("paradigm", list(a.paradigm))
    kinds = {axis.kind: axis for axis in a.intervention}
    kind = trial.suggest_categorical("intervention", list(kinds))
    mags = kinds[kind].magnitudes
    name = f"magnitude.{kind}"
    if isinstance(mags, Range):
        magnitude = trial.suggest_float(name, mags.low, mags.high, log=mags.log)
    else:
        magnitude = trial.suggest_categorical(name, list(mags))
    labels = {freeze_label(fd): fd for fd in a.freeze_depth}
    freeze = labels[trial.suggest_categorical("freeze_depth", list(labels))]
    seed = trial.suggest_categorical("seed", list(a.seed))
    finetune = tuple(sorted((k, trial.suggest_float(f"finetune.{k}", r.low, r.high, log=r.log))
                            for k, r in plan.spec.finetune.ranges().items()))
    return TrialPoint(backbone, paradigm, kind, float(magnitude), freeze, int(seed), finetune)


class StudySearcher(Searcher):
    """Asks Optuna for points until ``budget`` trials have finished (COMPLETE in the study)."""

    def __init__(self, plan: Plan, journal_path: str, *, study_name: str):
        s = plan.spec
        directions = ["maximize" if _dir(m) == "max" else "minimize" for m in (s.objectives.performance, s.objectives.fairness)]
        super().__init__(metric=None, mode=None)
        self.plan = plan
        self.journal_path = journal_path
        self.study_name = study_name
        self.directions = directions
        self.budget = int(s.search.budget)
        self._live: dict[str, int] = {}  # Tune trial id -> Optuna trial number
        self._study = None

    # -- the study, reopened from its journal after unpickling ------------------------------------
    @property
    def study(self) -> Any:
        if self._study is None:
            import optuna
            from optuna.storages import JournalStorage
            from optuna.storages.journal import JournalFileBackend

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            storage = JournalStorage(JournalFileBackend(self.journal_path))
            search = self.plan.spec.search
            self._study = optuna.create_study(study_name=self.study_name, storage=storage, directions=self.directions,
                                              sampler=make_sampler(search.sampler, search.seed), load_if_exists=True)
            asked = len(self._study.get_trials(deepcopy=False))
            if asked:  # a resumed study: a sampler seeded as at the start would replay its first draws
                self._study.sampler = make_sampler(search.sampler, search.seed + asked)
            self._fail_orphans()
        return self._study

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_study"] = None
        return state

    def _fail_orphans(self) -> None:
        """Trials asked before a driver died but unknown to the restored Tune run will never report."""
        from optuna.trial import TrialState

        live = set(self._live.values())
        orphans = [t.number for t in self._study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                   if t.number not in live]
        if orphans:  # recorded first, so a driver killed in between still knows they are orphans
            known = self._study.user_attrs.get(_ORPHAN_ATTR, [])
            self._study.set_user_attr(_ORPHAN_ATTR, sorted(set(known) | set(orphans)))
        for number in orphans:
            self._study.tell(number, state=TrialState.FAIL)

    def finished(self) -> int:
        """Trials that ran to the end; a duplicate proposal told its twin's result does not count."""
        from optuna.trial import TrialState

        return sum(_TWIN_ATTR not in t.user_attrs for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

    def failed(self) -> int:
        from optuna.trial import TrialState

        return len(self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))

    # -- Tune's searcher interface -----------------------------------------------------------------
    def set_search_properties(self, metric: Any, mode: Any, config: Any, **spec: Any) -> bool:
        return True  # objectives come from the sweep spec

    def suggest(self, trial_id: str) -> dict | None:
        from optuna.trial import TrialState

        if trial_id in self._live:  # Tune asks again for a restored trial
            return self._config(self.study.trials[self._live[trial_id]].user_attrs["point"])
        done = self.finished()
        if done >= self.budget or self.failed() >= max(self.budget, 10):
            return Searcher.FINISHED
        if done + len(self._live) >= self.budget:
            return None  # enough in flight; ask again if one of them fails
        for attempt in range(_MAX_DUPLICATE_DRAWS):
            if attempt == _ENQUEUE_AFTER:
                self._enqueue_unseen_cell()
            trial = self.study.ask()
            point = suggest_point(trial, self.plan)
            planned = self.plan.resolve(point)
            twin = self._twin(planned.key)
            if twin is None:
                trial.set_user_attr(_KEY_ATTR, planned.key)
                trial.set_user_attr("point", json.dumps(point.as_config()))
                trial.set_user_attr("tune_trial_id", trial_id)
                self._live[trial_id] = trial.number
                return self._config(json.dumps(point.as_config()))
            # the sampler asked for a configuration that already ran (tell it the known result), is
            # running now or failed (prune the copy): either way it does not run twice and does not count
            trial.set_user_attr(_TWIN_ATTR, twin.number)
            if twin.values is not None:
                self.study.tell(trial, twin.values)
            else:
                self.study.tell(trial, state=TrialState.PRUNED)
        raise RuntimeError(f"the {self.plan.spec.search.sampler} sampler proposed {_MAX_DUPLICATE_DRAWS} configurations in a "
                           f"row that already ran; the space ({self.plan.spec.grid_size} cells) looks exhausted — use a grid")

    def on_trial_complete(self, trial_id: str, result: Mapping[str, Any] | None = None, error: bool = False) -> None:
        from optuna.trial import TrialState

        number = self._live.pop(trial_id, None)
        if number is None:
            return
        if self.study.trials[number].state != TrialState.RUNNING:
            return  # told before the driver died (the trial finished after Tune's last state save)
        values = search_values(self.plan.spec.objectives, result) if result and not error else None
        if values is None:
            self.study.tell(number, state=TrialState.FAIL)
        else:
            self.study.tell(number, values)

    def _twin(self, key: str) -> Any:
        """The finished, in-flight or failed trial that already has this key, if any. A failed one is
        not run again (its failure would repeat; `resume --retry-errored` retries it); a trial that
        only failed because its driver died (an orphan) is no twin: that configuration may run."""
        from optuna.trial import TrialState

        orphans = set(self.study.user_attrs.get(_ORPHAN_ATTR, []))
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING, TrialState.FAIL)):
            if (t.user_attrs.get(_KEY_ATTR) == key and _TWIN_ATTR not in t.user_attrs
                    and not (t.state == TrialState.FAIL and t.number in orphans)):
                return t
        return None

    def _enqueue_unseen_cell(self) -> None:
        """When a categorical space is nearly used up the sampler keeps proposing what already ran:
        hand it the first cell that has not run, so the budget is still reached."""
        from orchestrator.plan import grid_points

        if any(isinstance(a.magnitudes, Range) for a in self.plan.spec.axes.intervention) or self.plan.spec.finetune.ranges():
            return  # continuous axes: duplicates are improbable, nothing to enumerate
        seen = {t.user_attrs.get(_KEY_ATTR) for t in self.study.get_trials(deepcopy=False)}
        for point in grid_points(self.plan.spec):
            if self.plan.resolve(point).key not in seen:
                self.study.enqueue_trial({"backbone": point.backbone, "paradigm": point.paradigm,
                                          "intervention": point.intervention, f"magnitude.{point.intervention}": point.magnitude,
                                          "freeze_depth": freeze_label(point.freeze_depth), "seed": point.seed})
                return

    @staticmethod
    def _config(point_json: str) -> dict:
        return {"point": json.loads(point_json)}

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "w") as f:
            json.dump({"live": self._live}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as f:
            self._live = {k: int(v) for k, v in json.load(f)["live"].items()}
        self._study = None  # reopen from the journal, failing orphans against the restored live set


def search_values(objectives: Any, result: Mapping[str, Any]) -> list[float] | None:
    """What the study is told: the objectives on the VALIDATION split (``val_`` metrics), never the test
    split, which only reports; a signed metric as its absolute value (its distance from parity). None
    when the result lacks one of them."""
    from trainables.metrics import is_signed

    values = []
    for metric in (objectives.performance, objectives.fairness):
        value = result.get(f"val_{metric}")
        if value is None:
            return None
        values.append(abs(float(value)) if is_signed(metric) else float(value))
    return values


def _dir(metric: str) -> str:
    from trainables.metrics import direction

    return direction(metric)
