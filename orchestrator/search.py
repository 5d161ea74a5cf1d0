"""Multi-objective search with Optuna, as a Ray Tune searcher.

Optuna's samplers (TPE, NSGA-II, random) propose points of the sweep's space; Tune runs them. The
study lives in a journal file beside the sweep's Tune state (or in the database ``search.storage``
names), written at every ask and tell, so a driver killed at any moment resumes the same study: the
sampler continues from everything it was told, and no configuration runs twice. The study names its
objectives (``study.set_metric_names``), so Optuna's plots and optuna-dashboard show ``val_accuracy``
rather than "Objective 0". This is a thin adapter over Optuna's ask/tell rather than Ray's ``OptunaSearch`` because the budget counts *finished* trials (a failed trial is reported and
replaced, never counted) and because the study must outlive a pickled searcher.

Optuna is imported inside the functions that open or read a study: a grid sweep imports this module
(the launch checks the study's storage first) but never needs Optuna, which takes a second to load.
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import sqlite3
import uuid
import warnings
from typing import Any, Mapping
from urllib.parse import urlsplit

from ray.tune.search import Searcher

from orchestrator.plan import Plan, grid_points
from orchestrator.samplers import SAMPLERS
from orchestrator.spec import Range
from trainables.errors import UserError
from trainables.metrics import direction, is_signed
from trainables.trial import TUNE_KEY, Freeze, TrialPoint

__all__ = ["StudySearcher", "make_sampler", "suggest_point", "search_values", "objective_names", "STUDY_FILE",
           "StudyStorageError", "resolve_storage_url", "open_rdb_storage", "check_study_storage"]

STUDY_FILE = "optuna_study.journal"
_KEY_ATTR, _TWIN_ATTR, _ORPHAN_ATTR = "trial_key", "duplicate_of", "orphaned"
_SWEEP_ATTR = "fairsweep_sweep_id"  # which launch created the study: a shared database may hold an older one
_ENDED_ATTR = "fairsweep_search_ended"  # why the searcher stopped proposing: the sweep is then over, not interrupted
_MAX_DUPLICATE_DRAWS = 50
_ENQUEUE_AFTER = 10  # duplicate draws in a row before a categorical space's unseen cell is enqueued


def make_sampler(name: str, seed: int) -> Any:
    """The Optuna sampler registered as ``name`` (orchestrator.samplers; a plugin may add one), seeded."""
    return SAMPLERS.get(name)(seed)


def suggest_point(trial: Any, plan: Plan) -> TrialPoint:
    """Define-by-run: one point of the sweep's space. Lists are categorical, ranges continuous; each
    intervention kind has its own magnitude parameter, since their ranges differ. Freezing is a categorical
    of ``Freeze`` labels; the finetuning size is a parameter only when the axis has several."""
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
    freeze = Freeze.from_label(trial.suggest_categorical("freeze_depth", [fd.label() for fd in a.freeze_depth]))
    seed = trial.suggest_categorical("seed", list(a.seed))
    finetune = tuple(sorted((k, trial.suggest_float(f"finetune.{k}", r.low, r.high, log=r.log))
                            for k, r in plan.spec.finetune.ranges().items()))
    size = a.finetune_size[0]  # one size is no choice: asking for it would change existing sweeps' draws
    if len(a.finetune_size) > 1:
        size = trial.suggest_categorical("finetune_size", list(a.finetune_size))
    return TrialPoint(backbone, paradigm, kind, float(magnitude), freeze, int(seed), int(size), finetune)


class StudySearcher(Searcher):
    """Asks Optuna for points until ``budget`` trials have finished (COMPLETE in the study).

    The study is kept in ``journal_path``, unless the spec's ``search.storage`` names a database: then
    there (an optuna ``RDBStorage``) and ``journal_path`` is unused, so the caller needs no change.
    """

    storage_url: str | None = None  # class defaults: a searcher pickled by an older fairsweep lacks them
    sweep_id: str | None = None
    max_concurrent: int | None = None  # the sweep's max_concurrent_trials, kept here rather than by Tune's wrapper
    _resumed: frozenset | None = None  # Tune trial ids a restore runs again; None: no Tune state was read

    def __init__(self, plan: Plan, journal_path: str, *, study_name: str, max_concurrent: int | None = None,
                 sweep_id: str | None = None):
        s = plan.spec
        directions = ["maximize" if _dir(m) == "max" else "minimize" for m in (s.objectives.performance, s.objectives.fairness)]
        super().__init__(metric=None, mode=None)
        self.plan = plan
        self.journal_path = journal_path
        self.study_name = study_name
        self.directions = directions
        self.budget = int(s.search.budget)
        # resolved now, in the launch directory: the pickled searcher resumes from anywhere
        self.storage_url = resolve_storage_url(s.search.storage)
        self.sweep_id = sweep_id or uuid.uuid4().hex  # a launch started again from its record keeps its study
        self.max_concurrent = max_concurrent
        self._live: dict[str, int] = {}  # Tune trial id -> Optuna trial number
        self._study = None

    @property
    def metric_names(self) -> list[str]:
        return objective_names(self.plan.spec.objectives)

    # -- the study, reopened from its journal after unpickling ------------------------------------
    @property
    def study(self) -> Any:
        if self._study is None:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            search = self.plan.spec.search
            study = optuna.create_study(study_name=self.study_name, storage=self._storage(), directions=self.directions,
                                        sampler=make_sampler(search.sampler, search.seed), load_if_exists=True)
            self._claim(study)
            if study.metric_names is None:
                with warnings.catch_warnings():  # "experimental" since Optuna 3.2; what its plots and dashboard read
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    study.set_metric_names(self.metric_names)
            self._study = study
            asked = len(self._study.get_trials(deepcopy=False))
            if asked:  # a resumed study: a sampler seeded as at the start would replay its first draws
                self._study.sampler = make_sampler(search.sampler, search.seed + asked)
            self._fail_orphans()
        return self._study

    def _storage(self) -> Any:
        """Where the study lives: ``search.storage``'s database, else the journal file beside the sweep."""
        if self.storage_url:
            return open_rdb_storage(self.storage_url)
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(self.journal_path))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_study"] = None
        return state

    def _claim(self, study: Any) -> None:
        """Mark a new study as this sweep's; refuse one another launch created (a shared database that
        already held a study of this name), rather than silently counting its trials toward the budget."""
        if self.sweep_id is None:
            return
        owner = study.user_attrs.get(_SWEEP_ATTR)
        if owner is None:
            study.set_user_attr(_SWEEP_ATTR, self.sweep_id)
        elif owner != self.sweep_id:
            where = _masked(self.storage_url) if self.storage_url else self.journal_path
            raise StudyStorageError(f"the Optuna storage {where} already holds a study named {self.study_name!r} "
                                    f"from another launch; give the sweep another name, or delete that study "
                                    f"(optuna delete-study --storage URL --study-name {self.study_name})")

    def _fail_orphans(self) -> None:
        """Reconcile the restored live set with the study and with Tune's restored trials, then fail the orphans:
        trials asked before a driver died that the restored Tune run will never report. Tune's trial state and
        this searcher's are saved (and uploaded) apart, so a killed driver can leave either one newer:
        - a live entry whose study trial was already told (finished or failed) is dropped;
        - a live entry Tune's state does not hold as unfinished will never report: dropped, its trial an orphan;
        - a study trial Tune resumes (the study names each trial's Tune id) is live, not an orphan: failing it
          would let it finish uncounted and the search run one trial past its budget."""
        from optuna.trial import TrialState

        running = {t.number: t for t in self._study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        self._live = {tune_id: n for tune_id, n in self._live.items()
                      if n in running and (self._resumed is None or tune_id in self._resumed)}
        for t in running.values():
            tune_id = t.user_attrs.get("tune_trial_id")
            if self._resumed and tune_id in self._resumed and tune_id not in self._live:
                self._live[tune_id] = t.number
        live = set(self._live.values())
        orphans = [n for n in running if n not in live]
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

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        """The searcher limits concurrency itself (the launch gives it the cap and Tune none): Tune's
        ConcurrencyLimiter keeps its own list of live trials, saved apart from this searcher's, and drops the
        completion of a trial missing from it (after a driver was killed mid-save), which would leave that
        trial live here for ever and the search waiting on it. Should Tune wrap it anyway, the wrapper passes
        everything through."""
        self.max_concurrent = max_concurrent
        return True

    def suggest(self, trial_id: str) -> dict | None:
        from optuna.trial import TrialState

        self.study  # opened first: reopening adopts the trials a restore resumes
        if trial_id in self._live:  # Tune asks again for a restored trial
            point = json.loads(self.study.trials[self._live[trial_id]].user_attrs["point"])
            return self._config(TrialPoint.from_dict(point))
        done = self.finished()
        if done >= self.budget:
            return self._end(f"the budget of {self.budget} finished trials was reached")
        # The two ends below do not wait for the trials in flight: Tune runs them to their end, and a sweep
        # stopped meanwhile is still an interruption (the launch reads Tune's unfinished trials)
        if self.failed() >= max(self.budget, 10):
            return self._end(f"{self.failed()} trials failed or gave the search no objective values (at most "
                             f"max(budget, 10) = {max(self.budget, 10)})")
        if done + len(self._live) >= self.budget:
            return None  # enough in flight; ask again if one of them fails
        if self.max_concurrent and len(self._live) >= self.max_concurrent:
            return None
        for attempt in range(_MAX_DUPLICATE_DRAWS):
            if attempt == _ENQUEUE_AFTER and self._enqueue_unseen_cell() is False:
                # every cell has run, is running or failed: nothing new can be proposed (a failed cell is not run
                # again; `resume --retry-errored` retries it)
                return self._end(f"every one of the space's {self.plan.spec.grid_size} configurations has run, "
                                 f"runs or failed ({done} finished, budget {self.budget})")
            trial = self.study.ask()
            point = suggest_point(trial, self.plan)
            planned = self.plan.resolve(point)
            twin = self._twin(planned.key)
            if twin is None:
                trial.set_user_attr(_KEY_ATTR, planned.key)
                trial.set_user_attr("point", json.dumps(point.to_dict()))
                trial.set_user_attr("tune_trial_id", trial_id)
                self._live[trial_id] = trial.number
                return self._config(point)
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

        study = self.study  # opened first: reopening adopts the trials a restore resumes, before any is told
        number = self._live.pop(trial_id, None)
        if number is None:
            return  # not a trial of this study's live set
        if study.trials[number].state != TrialState.RUNNING:
            return  # told before the driver died (the trial finished after Tune's last state save)
        values = search_values(self.plan.spec.objectives, result) if result and not error else None
        if values is None:
            self.study.tell(number, state=TrialState.FAIL)
        else:
            self.study.tell(number, values)

    def _end(self, reason: str) -> str:
        """Record why the search stopped proposing (read by ``ended``) and tell Tune it is finished."""
        if self.study.user_attrs.get(_ENDED_ATTR) != reason:
            self.study.set_user_attr(_ENDED_ATTR, reason)
        return Searcher.FINISHED

    def ended(self) -> str | None:
        """Why the search ended, as recorded in the study, or None while it may still propose (an interrupted
        sweep). Read from a fresh copy of the study, without adopting or failing any of its trials."""
        import optuna

        try:
            study = optuna.load_study(study_name=self.study_name, storage=self._storage())
        except KeyError:  # never asked for a trial: no study yet
            return None
        return study.user_attrs.get(_ENDED_ATTR)

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

    def _enqueue_unseen_cell(self) -> bool | None:
        """When a categorical space is nearly used up the sampler keeps proposing what already ran:
        hand it the first cell that has not run, so the budget is still reached. True when one was enqueued,
        False when every cell has run, runs or failed, None for a space with continuous axes."""
        if any(isinstance(a.magnitudes, Range) for a in self.plan.spec.axes.intervention) or self.plan.spec.finetune.ranges():
            return None  # continuous axes: duplicates are improbable, nothing to enumerate
        orphans = set(self.study.user_attrs.get(_ORPHAN_ATTR, []))  # cut short by a dead driver: may run again
        seen = {t.user_attrs.get(_KEY_ATTR) for t in self.study.get_trials(deepcopy=False)
                if t.number not in orphans and _TWIN_ATTR not in t.user_attrs}
        for point in grid_points(self.plan.spec):
            if self.plan.resolve(point).key not in seen:
                params = {"backbone": point.backbone, "paradigm": point.paradigm, "intervention": point.intervention,
                          f"magnitude.{point.intervention}": point.magnitude, "freeze_depth": point.freeze_depth.label(),
                          "seed": point.seed}
                if len(self.plan.spec.axes.finetune_size) > 1:
                    params["finetune_size"] = point.finetune_size
                self.study.enqueue_trial(params)
                return True
        return False

    def _config(self, point: TrialPoint) -> dict:
        """The Tune config of a point: its ``TrialConfig`` as the plan builds it (trainables/trial.py)."""
        return {TUNE_KEY: self.plan.resolve(point).config.to_dict()}

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "w") as f:
            json.dump({"live": self._live}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as f:
            self._live = {k: int(v) for k, v in json.load(f)["live"].items()}
        # the sweep folder (the journal's), where Tune's restore read its trials: the copy beside the searcher's
        # state is a staging folder, which on a long-lived cluster may hold a newer file a killed driver left
        self._resumed = _unfinished_tune_trials(os.path.dirname(self.journal_path))
        self._study = None  # reopen from the journal, failing orphans against the restored live set


def _unfinished_tune_trials(experiment_dir: str) -> frozenset | None:
    """Ids of the trials that Tune's newest experiment state in ``experiment_dir`` holds as unfinished
    (PENDING, RUNNING, PAUSED): the ones a restore runs again, read as Tune's restore reads that folder.
    None when there is no state or it cannot be read (then nothing is known about Tune's trials)."""
    from ray.tune.execution.tune_controller import TuneController

    pattern = TuneController.CKPT_FILE_TMPL.format("*")
    names = fnmatch.filter(os.listdir(experiment_dir), pattern) if os.path.isdir(experiment_dir) else []
    if not names:
        return None
    try:
        with open(os.path.join(experiment_dir, max(names))) as f:  # Tune's choice: the newest by its timestamp
            trial_data = json.load(f)["trial_data"]
        states = [json.loads(trial_state) for trial_state, _ in trial_data]
        return frozenset(st["trial_id"] for st in states if st.get("status") in ("PENDING", "RUNNING", "PAUSED"))
    except (OSError, ValueError, KeyError, TypeError):  # a state Tune could not restore from either
        return None


def search_values(objectives: Any, result: Mapping[str, Any]) -> list[float] | None:
    """What the study is told: the objectives on the VALIDATION split (``val_`` metrics), never the test
    split, which only reports; a signed metric as its absolute value (its distance from parity). None
    when the result lacks one of them."""
    infinite = set(str(result.get("infinite_metrics") or "").split(","))
    values = []
    for metric in (objectives.performance, objectives.fairness):
        value = result.get(f"val_{metric}")
        if value is None and f"val_{metric}" in infinite:  # a ratio against a zero rate: as unfair as it gets
            value = math.inf
        if value is None:
            return None
        values.append(abs(float(value)) if is_signed(metric) else float(value))
    return values


def objective_names(objectives: Any) -> list[str]:
    """The names the study gives its values (what ``search_values`` tells it): ``val_accuracy``, or
    ``abs(val_tpr_difference)`` for a signed metric, whose distance from parity is what is minimised."""
    return [f"abs(val_{m})" if is_signed(m) else f"val_{m}" for m in (objectives.performance, objectives.fairness)]


class StudyStorageError(UserError, ValueError):
    """The study's database cannot be used; the message names ``search.storage``, the URL and the fix."""


def _masked(url: str) -> str:
    """The URL with any password hidden (the spec refuses one, but a library caller may pass one)."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return url
    return url.replace(f":{password}@", ":***@", 1) if password else url


def resolve_storage_url(url: str | None, base_dir: str | None = None) -> str | None:
    """A relative SQLite path made absolute against ``base_dir`` (default: the working directory), so
    the study is the same file whichever directory a resume runs from; other URLs are unchanged."""
    match = re.match(r"sqlite(\+\w+)?:///", url or "")  # sqlite:///, or with a driver: sqlite+pysqlite:///
    if match is None or url[match.end():].startswith("/"):
        return url
    prefix = match.group(0)
    return prefix + os.path.abspath(os.path.join(base_dir or os.getcwd(), os.path.expanduser(url[len(prefix):])))


def _sqlite_file(url: str) -> str | None:
    for prefix in ("sqlite:///", "sqlite+pysqlite:///"):
        if url.startswith(prefix):
            return url[len(prefix):].split("?")[0]
    return None


def open_rdb_storage(url: str) -> Any:
    """Optuna's ``RDBStorage`` for ``url``; ``StudyStorageError`` saying what to do when it cannot open
    (a database driver that is not installed, a server that does not answer, a file that cannot be written)."""
    import optuna

    try:
        return optuna.storages.RDBStorage(url)
    except ImportError as exc:
        raise StudyStorageError(f"search.storage {_masked(url)}: its database driver is not installed ({exc}); "
                                f"install it in this environment (postgresql: pip install psycopg2-binary; "
                                f"mysql: pip install PyMySQL and write mysql+pymysql://)") from None
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy's errors: an unreachable server, bad credentials
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise StudyStorageError(f"search.storage {_masked(url)}: cannot open the Optuna storage ({first}); check "
                                f"the URL, that the database answers from this machine, and its credentials") from None


def check_study_storage(spec: Any) -> None:
    """Before a launch (nothing started yet): the database of ``search.storage`` opens, is an Optuna
    storage or a new file (never another program's database, e.g. MLflow's), and holds no study of
    this sweep's name, which the sweep would otherwise continue. Nothing to check for the journal."""
    url = resolve_storage_url(spec.search.storage)
    if spec.search.type != "optuna" or not url:
        return
    path = _sqlite_file(url)
    if path is not None:
        folder = os.path.dirname(path) or "."
        if not os.path.isdir(folder):
            raise StudyStorageError(f"search.storage {url}: the folder {folder} does not exist; create it or point "
                                    f"the URL at an existing folder")
        if not os.path.exists(path):
            return  # a new file: the searcher creates it, and it holds no study yet
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
                tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.Error as exc:
            raise StudyStorageError(f"search.storage {url}: cannot read {path} as SQLite ({exc}); point it at "
                                    f"another file") from None
        if tables and "studies" not in tables:
            raise StudyStorageError(f"search.storage {url}: {path} is an SQLite database but not an Optuna storage "
                                    f"(its tables: {', '.join(sorted(tables)[:8])}); use a file of its own, e.g. "
                                    f"sqlite:///{os.path.join(folder, 'optuna.db')}")
    storage = open_rdb_storage(url)
    try:
        try:
            study_id = storage.get_study_id_from_name(spec.name)
        except KeyError:
            return
        n = len(storage.get_all_trials(study_id, deepcopy=False))
    finally:
        storage.engine.dispose()
    raise StudyStorageError(f"search.storage {_masked(url)}: already holds an Optuna study named {spec.name!r} ({n} "
                            f"trials), from an earlier sweep of that name; continue that sweep with `fairsweep resume "
                            f"{spec.name}`, give this one another `name:`, or delete the study (optuna delete-study "
                            f"--storage URL --study-name {spec.name})")


def _dir(metric: str) -> str:
    return direction(metric)
