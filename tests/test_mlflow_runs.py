"""fairsweep's runs in MLflow, against a real SQLite store: paged search returns every run across pages
(and every reader pages), filters pick the runs their tags say, and the parent run is found among many."""
from __future__ import annotations

import gc
import json

import pytest
from mlflow.entities import Param
from mlflow.tracking import MlflowClient

from orchestrator import mlflow_runs, query
from orchestrator.mlflow_runs import TAGS, find_parent_run, run_filter, search_runs
from orchestrator.plan import build_plan
from orchestrator.spec import parse_spec
from orchestrator.status import sweep_status
from orchestrator.storage import SWEEP_RECORD
from orchestrator.tracking import SweepTracker
from tests.helpers import sqlite_uri, tiny_spec
from trainables.errors import UserError

# sweep "tiny" (the tiny spec's name, so status and the tracker read it): 7 trial runs, 5 FINISHED, 2 FAILED
TINY_TRIALS = ["FINISHED"] * 5 + ["FAILED"] * 2
OTHER_TRIALS = ["FINISHED"] * 3  # sweep "other" in the same experiment


class CountingClient:
    """The real client, counting search_runs calls and the page sizes asked for."""

    def __init__(self, client: MlflowClient):
        self._client = client
        self.sizes: list[int] = []

    def search_runs(self, *args, **kwargs):
        self.sizes.append(kwargs["max_results"])
        return self._client.search_runs(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._client, name)


def _run(client: MlflowClient, exp_id: str, status: str, **tags: str) -> str:
    run = client.create_run(exp_id, tags=tags)
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    uri = sqlite_uri(tmp)
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("tiny")
    ids: dict[str, list[str]] = {"tiny": [], "tiny_finished": [], "other": []}
    for i, status in enumerate(TINY_TRIALS):
        run_id = _run(client, exp_id, status, **{TAGS.SWEEP: "tiny", TAGS.KIND: "trial", TAGS.TRIAL_KEY: f"k{i}",
                                                 TAGS.CONFIG_KEY: f"c{i}"})
        client.log_batch(run_id, params=[Param("seed", "0"), Param("paradigm", "scratch")])
        ids["tiny"].append(run_id)
        if status == "FINISHED":
            ids["tiny_finished"].append(run_id)
    for i, status in enumerate(OTHER_TRIALS):
        ids["other"].append(_run(client, exp_id, status, **{TAGS.SWEEP: "other", TAGS.KIND: "trial",
                                                             TAGS.TRIAL_KEY: f"o{i}"}))
    ids["parent"] = [_run(client, exp_id, "RUNNING", **{TAGS.SWEEP: "tiny", TAGS.KIND: "sweep", TAGS.DRIVER: "nohost:1",
                                                        TAGS.FRONT_SIZE: "3"})]
    ids["pretrain"] = [_run(client, exp_id, "FINISHED", **{TAGS.SWEEP: "tiny", TAGS.KIND: "pretrain",
                                                           TAGS.PRETRAIN_KEY: "p1"})]
    return {"uri": uri, "client": client, "exp_id": exp_id, "ids": ids, "tmp": tmp}


@pytest.fixture
def small_pages(monkeypatch):
    """Every reader asks MLflow for 2 runs a call, so a sweep of a few runs spans several pages."""
    monkeypatch.setattr(mlflow_runs, "PAGE_SIZE", 2)


def test_search_reads_every_page(store):
    client = CountingClient(store["client"])
    found = [r.info.run_id for r in search_runs(client, [store["exp_id"]], run_filter(sweep="tiny", kind="trial"),
                                                page_size=2)]
    assert sorted(found) == sorted(store["ids"]["tiny"]) and len(found) == len(set(found)) == 7
    assert client.sizes == [2, 2, 2, 2]  # 2 + 2 + 2 + 1: the fourth page has no token after it


def test_a_limit_stops_after_that_many_runs_asking_for_no_more(store):
    client = CountingClient(store["client"])
    runs = list(search_runs(client, [store["exp_id"]], run_filter(sweep="tiny", kind="trial"), limit=3, page_size=2))
    assert len(runs) == 3 and {r.info.run_id for r in runs} <= set(store["ids"]["tiny"])
    assert client.sizes == [2, 1]
    client.sizes.clear()
    assert len(list(search_runs(client, [store["exp_id"]], run_filter(kind="trial"), limit=1))) == 1
    assert client.sizes == [1]
    with pytest.raises(ValueError, match=r"limit=0: expected a number of runs >= 1"):
        next(search_runs(client, [store["exp_id"]], run_filter(kind="trial"), limit=0))


def test_the_collector_runs_between_pages(store):
    """The collector is paused only inside MLflow's call: the caller's work between pages runs with it on."""
    assert gc.isenabled()
    runs = search_runs(store["client"], [store["exp_id"]], run_filter(sweep="tiny", kind="trial"), page_size=2)
    next(runs)
    assert gc.isenabled()
    runs.close()


def test_filters_pick_runs_by_sweep_kind_status_and_pretraining_key(store):
    ids, exp = store["ids"], [store["exp_id"]]

    def found(**kwargs) -> set[str]:
        return {r.info.run_id for r in search_runs(store["client"], exp, run_filter(**kwargs), page_size=2)}

    assert found(sweep="tiny", kind="trial", status="FINISHED") == set(ids["tiny_finished"])
    assert found(sweep="tiny", kind="trial", status="FAILED") == set(ids["tiny"]) - set(ids["tiny_finished"])
    assert found(sweep="other", kind="trial") == set(ids["other"])
    assert found(kind="trial") == set(ids["tiny"] + ids["other"])
    assert found(sweep="tiny") == set(ids["tiny"] + ids["parent"] + ids["pretrain"])
    assert found(kind="pretrain", status="FINISHED", pretrain_key="p1") == set(ids["pretrain"])
    assert found(kind="pretrain", pretrain_key="p2") == set()


def test_a_filter_refuses_a_quote_and_an_empty_filter():
    with pytest.raises(ValueError, match=r"sweep name \"a'b\" contains a quote; sweep names are plain identifiers") as err:
        run_filter(sweep="a'b", kind="trial")
    assert isinstance(err.value, UserError)  # the user's to fix: the CLI prints it and exits 2, no traceback
    with pytest.raises(UserError, match=r"pretraining key \"k'1\" contains a quote"):
        run_filter(kind="pretrain", pretrain_key="k'1")
    with pytest.raises(ValueError, match="an empty filter is every run"):
        run_filter()


def test_the_parent_run_is_found_behind_pages_of_trial_runs(store, small_pages):
    client = CountingClient(store["client"])
    parent = find_parent_run(client, store["exp_id"], "tiny")
    assert parent.info.run_id == store["ids"]["parent"][0] and client.sizes == [1]
    assert find_parent_run(client, store["exp_id"], "other") is None  # trial runs only: no parent


def test_every_reader_reads_past_the_first_page(store, small_pages, tmp_path):
    """The query API, the tracker, the sweep list and status see all 7 trial runs with pages of 2."""
    client, exp_id, ids = store["client"], store["exp_id"], store["ids"]
    trials = query.load_trials(client, "tiny", "tiny", finished_only=False)
    assert sorted(trials["run_id"]) == sorted(ids["tiny"])
    assert sorted(query.load_trials(client, "tiny", "tiny")["run_id"]) == sorted(ids["tiny_finished"])
    assert query.list_sweeps(client, "tiny") == ["tiny"]  # the sweep with a parent run

    tracker = SweepTracker(build_plan(parse_spec(tiny_spec())), store["uri"])
    tracker.experiment_id = exp_id
    assert tracker.trial_status_counts() == {"FINISHED": 5, "FAILED": 2}
    assert sorted(tracker.trial_run_ids("FINISHED")) == sorted(ids["tiny_finished"])

    folder = tmp_path / "results" / "tiny"
    folder.mkdir(parents=True)
    (folder / SWEEP_RECORD).write_text(json.dumps({"spec": tiny_spec(), "tracking_uri": store["uri"]}))
    status = sweep_status("tiny", str(tmp_path / "results"))
    assert (status.finished, status.errored, status.front_size, status.parent_status) == (5, 2, 3, "RUNNING")


def test_sweeps_without_parent_runs_are_named_from_their_trial_runs(tmp_path, small_pages):
    client = MlflowClient(tracking_uri=sqlite_uri(tmp_path))
    exp_id = client.create_experiment("loose")
    for i, sweep in enumerate(["a", "a", "b", "a", "c"]):
        _run(client, exp_id, "FINISHED", **{TAGS.SWEEP: sweep, TAGS.KIND: "trial", TAGS.TRIAL_KEY: str(i)})
    assert query.list_sweeps(client, "loose") == ["a", "b", "c"]
