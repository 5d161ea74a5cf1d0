"""Paper A on synthetic_images: the shortcut bases, and the effects the shipped study relies on.

The unit tests check how a shortcut base's source rows are drawn and that its trainer uses them. The
slow test (``test_paper_a_effects_hold_over_seeds``) pretrains the study's bases and finetunes them
through ``train_and_evaluate`` at small scale, and checks paper A's findings as intervals over seeds,
never as one noisy comparison.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from trainables import interventions
from trainables.data import build_dataset
from trainables.paradigms import PARADIGMS, ParadigmError

SOURCE = {"n_source": 400, "n_finetune": 64, "n_val": 16, "n_test": 16}


@pytest.mark.parametrize("paradigm, attribute", [("biased", "groups"), ("control", "stripes")])
def test_shortcut_rows_realise_the_share_with_balanced_labels(paradigm, attribute):
    meta = build_dataset("synthetic_images", SOURCE).meta("source")
    entry = PARADIGMS.get(paradigm)
    options = entry.resolve_options({"shortcut_correlation": 0.9})
    values = meta.groups if attribute == "groups" else meta.extra_labels[attribute]
    rows = entry.rows(meta, options, 0)
    assert len(rows) == interventions.largest_feasible_size("correlation", meta.labels, values, 0.9) > len(meta) // 2
    assert len(np.unique(rows)) == len(rows)
    assert abs(np.mean(meta.labels[rows] == values[rows]) - 0.9) <= 1 / len(rows)
    assert abs(int(meta.labels[rows].sum()) - len(rows) / 2) <= 1
    assert np.array_equal(rows, entry.rows(meta, options, 0)) and not np.array_equal(rows, entry.rows(meta, options, 1))
    # the labels are the target's; unset, the base predicts the attribute over every row
    assert np.array_equal(entry.labels(meta, options), meta.labels)
    plain = entry.resolve_options({})
    assert plain["shortcut_correlation"] is None and entry.rows(meta, plain, 0) is None
    assert np.array_equal(entry.labels(meta, plain), values)


def test_a_source_split_without_the_needed_cells_is_refused_naming_the_option():
    meta = build_dataset("synthetic_images", {**SOURCE, "source_correlation": 1.0}).meta("source")
    entry = PARADIGMS.get("biased")
    with pytest.raises(ParadigmError, match=r"shortcut_correlation 0\.0: no subset"):
        entry.rows(meta, entry.resolve_options({"shortcut_correlation": 0.0}), 0)


def test_variants_give_one_sweep_several_bases_of_a_paradigm(tmp_path):
    """NAME.VARIANT is the registered paradigm NAME under a name of its own: its own options, job and key."""
    from orchestrator.plan import build_plan
    from orchestrator.spec import SpecError, parse_spec
    from tests.helpers import tiny_spec

    spec = tiny_spec(**{"axes.paradigm": ["biased", "biased.shortcut", "control", "control.shortcut"],
                        "pretraining.paradigms": {"biased.shortcut": {"shortcut_correlation": 0.9},
                                                  "control.shortcut": {"shortcut_correlation": 0.9}}})
    plan = build_plan(parse_spec(spec))
    jobs = {j.paradigm: j for j in plan.pretrain_jobs}
    assert sorted(jobs) == ["biased", "biased.shortcut", "control", "control.shortcut"]
    assert len({j.key for j in jobs.values()}) == 4
    assert jobs["biased"].hparams.options["shortcut_correlation"] is None
    assert jobs["biased.shortcut"].hparams.options == {"label_smoothing": 0.0, "shortcut_correlation": 0.9}
    assert {t.point.paradigm for t in plan.trials} == set(jobs)
    assert all(t.config.weights.key == jobs[t.point.paradigm].key for t in plan.trials)

    def error(**overrides) -> SpecError:
        with pytest.raises(SpecError) as info:
            build_plan(parse_spec(tiny_spec(**overrides)))
        return info.value

    err = error(**{"axes.paradigm": ["control", "control.hat"], "pretraining.paradigms": {"control.hat": {"label": "hat"}}})
    assert err.path == "axes.paradigm[1]" and "'hat'" in str(err) and "stripes" in str(err)
    err = error(**{"axes.paradigm": ["biased.x"], "pretraining.paradigms": {"biased.x": {"shortcut": 0.9}}})
    assert err.path.startswith("pretraining.paradigms.biased.x") and "shortcut_correlation" in str(err)
    err = error(**{"axes.paradigm": ["nonesuch.x"]})
    assert err.path == "axes.paradigm[0]" and "nonesuch.x" in str(err)


def test_the_sweep_schema_checks_a_variant_by_its_paradigm_options():
    import jsonschema

    from orchestrator.spec import json_schema
    from tests.helpers import tiny_spec

    validator = jsonschema.Draft202012Validator(json_schema())

    def errors(options: dict) -> list[str]:
        spec = tiny_spec(**{"axes.paradigm": ["control.hat"], "pretraining.paradigms": {"control.hat": options}})
        return [e.message for e in validator.iter_errors(spec)]

    assert errors({"label": "hat", "shortcut_correlation": 0.9}) == []
    assert errors({"lable": "hat"}) and errors({"shortcut_correlation": 2})  # control's own options and bounds


def test_the_trainer_fits_the_shortcut_rows_only(monkeypatch, tmp_path):
    """What the supervised trainer hands the loop: the subset's inputs and the target's labels on it."""
    from trainables import loop
    from trainables.pretrain import run_pretrain_job

    seen = {}

    def spy(model, x, y, *args, **kwargs):
        seen["n"], seen["y"] = len(x), y.cpu().numpy()
        return 0.5

    monkeypatch.setattr(loop, "train_epoch", spy)
    data = {**SOURCE, "n_source": 80}
    job = {"key": "shortcut-spy", "backbone": "test_convnext", "paradigm": "biased.spy", "dataset": "synthetic_images",
           "dataset_options": data, "hparams": {"epochs": 1, "batch_size": 32, "lr": 0.05, "weight_decay": 0.0,
                                                "momentum": 0.9, "seed": 3, "options": {"shortcut_correlation": 0.75}}}
    run_pretrain_job(job, str(tmp_path))
    meta = build_dataset("synthetic_images", data).meta("source")
    entry = PARADIGMS.get("biased")
    rows = entry.rows(meta, entry.resolve_options({"shortcut_correlation": 0.75}), 3)
    assert seen["n"] == len(rows) < len(meta)
    assert np.array_equal(seen["y"], meta.labels[rows])


# ------------------------------------------------------------------------------- paper A's queries


def _trials(effects: dict[str, float], seeds: int = 5) -> Any:
    """A hand-made trials frame: unfairness = the base's effect + magnitude/10 + seed noise, so every
    number a query returns can be computed by hand."""
    import pandas as pd

    rows = []
    for paradigm, effect in effects.items():
        for size in (128, 1024):
            for magnitude in (0.5, 0.8):
                for seed in range(seeds):
                    noise = 0.01 * ((seed * 7 + len(paradigm)) % 5 - 2)
                    unfair = effect * (2.0 if size == 128 else 1.0) + magnitude / 10 + noise
                    rows.append({"run_id": f"{paradigm}{size}{magnitude}{seed}", "config_key": f"{paradigm}{size}{magnitude}",
                                 "backbone": "b", "paradigm": paradigm, "intervention.kind": "correlation",
                                 "intervention.magnitude": magnitude, "freeze_depth": "linear", "finetune.size": size,
                                 "seed": str(seed), "accuracy": 0.9 - magnitude / 5 + noise,
                                 "equalized_odds_difference": unfair, "tpr_difference": -unfair})
    return pd.DataFrame(rows)


def test_inheritance_pairs_by_seed_and_gives_intervals():
    from orchestrator import query

    trials = _trials({"biased": 0.3, "control": 0.05, "supervised": 0.0, "scratch": 0.2})
    table = query.inheritance(trials, "equalized_odds_difference")
    assert sorted(table["control"].unique()) == ["control", "supervised"]  # scratch is not a control base
    assert len(table) == 2 * 2 * 2 and (table["n_pairs"] == 5).all()
    row = table[(table["control"] == "control") & (table["finetune.size"] == 128)
                & (table["intervention.magnitude"] == 0.8)].iloc[0]
    b = trials[(trials["paradigm"] == "biased") & (trials["finetune.size"] == 128) & (trials["intervention.magnitude"] == 0.8)]
    c = trials[(trials["paradigm"] == "control") & (trials["finetune.size"] == 128) & (trials["intervention.magnitude"] == 0.8)]
    diff = b.sort_values("seed")["equalized_odds_difference"].to_numpy() - c.sort_values("seed")["equalized_odds_difference"].to_numpy()
    assert row["inheritance"] == pytest.approx(diff.mean()) == pytest.approx(0.5, abs=0.02)
    assert (row["inheritance_ci_low"], row["inheritance_ci_high"]) == pytest.approx(query.t_interval(diff))
    assert row["biased"] == pytest.approx(b["equalized_odds_difference"].mean())
    # signed metrics count by distance from parity, as the objectives do
    signed = query.inheritance(trials, "tpr_difference", controls=["control"])
    assert signed["inheritance"].to_numpy() == pytest.approx(
        table[table["control"] == "control"]["inheritance"].to_numpy())
    with pytest.raises(query.QueryError, match="no trial has paradigm 'gendered'"):
        query.inheritance(trials, "equalized_odds_difference", biased="gendered")
    with pytest.raises(query.QueryError, match=r"\['hats'\] have no trials"):
        query.inheritance(trials, "equalized_odds_difference", controls=["hats"])


def test_inheritance_intervals_stay_within_what_the_difference_can_take():
    """Two seeds far apart: the bases' intervals stop at equalized odds' range [0, 1], the difference's at
    [-1, 1]; a signed metric counts by |value|, so its bases' intervals stop at 0 too."""
    from orchestrator import query

    trials = _trials({"biased": 0.0, "control": 0.0}, seeds=2)
    biased = trials["paradigm"] == "biased"
    trials.loc[biased, "equalized_odds_difference"] = np.where(trials.loc[biased, "seed"] == "0", 0.02, 0.9)
    trials["tpr_difference"] = -trials["equalized_odds_difference"]
    for metric in ("equalized_odds_difference", "tpr_difference"):
        row = query.inheritance(trials, metric).iloc[0]
        assert row["n_pairs"] == 2 and (row["biased_ci_low"], row["biased_ci_high"]) == (0.0, 1.0), metric
        assert (row["inheritance_ci_low"], row["inheritance_ci_high"]) == (-1.0, 1.0), metric
        assert 0.0 <= row["control_value_ci_low"] < row["control_value_ci_high"] <= 1.0, metric


def test_fairest_level_names_the_magnitude_and_its_cost():
    from orchestrator import query

    trials = _trials({"biased": 0.3, "control": 0.05})
    table = query.fairest_level(trials, "accuracy", "equalized_odds_difference")
    assert len(table) == 4 and (table["fairest_intervention.magnitude"] == 0.5).all()
    assert (table["perf_cost"] == 0).all()  # here the fairest magnitude is also the most accurate
    row = table[(table["paradigm"] == "biased") & (table["finetune.size"] == 128)].iloc[0]
    cell = trials[(trials["paradigm"] == "biased") & (trials["finetune.size"] == 128) & (trials["intervention.magnitude"] == 0.5)]
    assert row["equalized_odds_difference"] == pytest.approx(cell["equalized_odds_difference"].mean())
    assert row["accuracy_ci_low"] < row["accuracy"] < row["accuracy_ci_high"]
    costly = trials.assign(accuracy=trials["accuracy"] + trials["intervention.magnitude"] / 2.5)  # now 0.8 is best
    assert query.fairest_level(costly, "accuracy", "equalized_odds_difference")["perf_cost"].to_numpy() == \
        pytest.approx([0.06] * 4)


def test_paper_a_figures_draw_every_panel(tmp_path):
    from orchestrator import figures, query

    trials = _trials({"biased": 0.3, "control": 0.05, "supervised": 0.0})
    fig = figures.magnitude_figure(query.aggregate_seeds(trials, ["equalized_odds_difference"]),
                                   "equalized_odds_difference")
    assert len(fig.axes) == 2 and all(len(ax.lines) >= 3 for ax in fig.axes)
    fig.savefig(tmp_path / "m.png")
    fig = figures.inheritance_figure(query.inheritance(trials, "equalized_odds_difference"),
                                     metric="equalized_odds_difference")
    assert [ax.get_title() for ax in fig.axes] == ["biased − control, freeze linear", "biased − supervised, freeze linear"]
    fig.savefig(tmp_path / "i.png")
    assert (tmp_path / "m.png").stat().st_size > 0 and (tmp_path / "i.png").stat().st_size > 0


# ------------------------------------------------------------------------------- the shipped studies


@pytest.mark.parametrize("name, levels", [("paper_a_synthetic.yaml", 6), ("paper_a_synthetic_full.yaml", 11)])
def test_the_synthetic_studies_hold_paper_a_design(name, levels):
    """Biased vs at least two control bases vs scratch, correlation levels, two sizes (128 and 1,024), a linear
    probe and full finetuning, 5 seeds; the trimmed file says in its comments what it trims."""
    from orchestrator.plan import build_plan
    from orchestrator.spec import load_spec
    from tests.helpers import REPO

    path = REPO / "sweeps" / name
    spec = load_spec(path)
    assert {"biased", "scratch"} <= set(spec.axes.paradigm) and len(set(spec.axes.paradigm) - {"biased", "scratch"}) >= 2
    magnitudes = spec.axes.intervention[0].magnitudes
    assert spec.axes.intervention[0].kind == "correlation" and len(magnitudes) == levels
    assert 0.5 in magnitudes and max(magnitudes) == 1.0 and any(0.7 <= m <= 0.8 for m in magnitudes)
    assert {128, 1024} <= set(spec.axes.finetune_size)
    labels = {f.label() for f in spec.axes.freeze_depth}
    assert {"linear", "0"} <= labels and len(labels) == 3  # and one partial freeze
    assert len(spec.axes.seed) == 5
    assert spec.pretraining.paradigms["biased"]["shortcut_correlation"] == 0.95
    assert spec.pretraining.paradigms["control"]["shortcut_correlation"] == 0.95
    if levels < 11:
        assert "Trimmed against paper A" in path.read_text()
        assert len(build_plan(spec).trials) == 720


def test_the_celeba_study_has_paper_a_control_attributes():
    from orchestrator.spec import load_spec
    from tests.helpers import REPO

    spec = load_spec(REPO / "sweeps" / "paper_a_celeba.yaml")
    controls = {p: spec.pretraining.paradigms[p]["label"] for p in spec.axes.paradigm if p.startswith("control.")}
    assert sorted(controls.values()) == ["Bangs", "Chubby", "Wearing_Hat"]  # paper A's
    assert set(controls.values()) <= set(spec.dataset.options["extra_labels"])
    assert spec.dataset.options["sensitive"] == ["Male"] and "biased" in spec.axes.paradigm
    assert len(spec.axes.intervention[0].magnitudes) == 11 and set(spec.axes.finetune_size) == {128, 1024}


# ------------------------------------------------------------------------------- the effects, over seeds


def _study_trials(tmp_path) -> Any:
    """Trials of sweeps/paper_a_synthetic.yaml's design at small scale, run in process (no Ray, no MLflow):
    its bases and data, the cells the findings are read at, 5 seeds."""
    import pandas as pd
    import yaml

    from orchestrator.launch import _trial_context
    from orchestrator.plan import build_plan
    from orchestrator.spec import parse_spec
    from tests.helpers import REPO
    from trainables.finetune import train_and_evaluate
    from trainables.pretrain import run_pretrain_job

    raw = yaml.safe_load((REPO / "sweeps" / "paper_a_synthetic.yaml").read_text())
    raw["axes"].update({"paradigm": ["supervised", "control", "biased"], "freeze_depth": ["linear", 4],
                        "intervention": {"kind": "correlation", "magnitudes": [0.5, 0.8]}})
    plan = build_plan(parse_spec(raw))
    for job in plan.pretrain_jobs:
        run_pretrain_job(job.to_dict(), str(tmp_path / "cache"))
    context = _trial_context(plan, str(tmp_path / "cache"), feature_cache=str(tmp_path / "features"))

    def wanted(p: Any) -> bool:
        probe, small = p.freeze_depth.label() == "linear", p.finetune_size == 128
        if p.magnitude == 0.8:  # A1 at the small size; the size moderator under the partial freeze
            return small or (not probe and p.paradigm != "supervised")
        return probe and small and p.paradigm == "biased"  # A2: the biased base's probe, balanced

    rows = []
    for trial in plan.trials:
        p = trial.point
        if wanted(p):
            r = train_and_evaluate(trial.config, context)
            rows.append({"run_id": trial.key, "config_key": trial.config_key, "backbone": p.backbone,
                         "paradigm": p.paradigm, "intervention.kind": p.intervention,
                         "intervention.magnitude": p.magnitude, "freeze_depth": p.freeze_depth.label(),
                         "finetune.size": p.finetune_size, "seed": str(p.seed), "accuracy": r["accuracy"],
                         "equalized_odds_difference": r["equalized_odds_difference"]})
    return pd.DataFrame(rows)


@pytest.mark.slow
def test_paper_a_effects_hold_over_seeds(tmp_path):
    """Paper A's findings on the shipped study's bases, each as a 95 % interval over 5 seeds (Student t), so a
    lucky seed cannot make one hold: A1 (under a frozen base the biased base is more unfair than every
    control at correlation 0.8, by >= 0.1, intervals disjoint), A2 (its probe is fairer at a balanced
    finetuning set than at 0.8), and the size moderator (inheritance larger at 128 examples than at 1,024)."""
    from orchestrator import query

    fair = "equalized_odds_difference"
    trials = _study_trials(tmp_path)
    configs = query.aggregate_seeds(trials, [fair]).set_index(["paradigm", "freeze_depth", "finetune.size",
                                                               "intervention.magnitude"])
    for depth in ("linear", "4"):  # A1
        biased = configs.loc[("biased", depth, 128, 0.8)]
        for control in ("control", "supervised"):
            other = configs.loc[(control, depth, 128, 0.8)]
            assert biased[fair] - other[fair] >= 0.1 and biased[f"{fair}_ci_low"] > other[f"{fair}_ci_high"], \
                (depth, control, biased[[fair, f"{fair}_ci_low"]].tolist(), other[[fair, f"{fair}_ci_high"]].tolist())
    probe = trials[(trials["paradigm"] == "biased") & (trials["freeze_depth"] == "linear")
                   & (trials["finetune.size"] == 128)].pivot(index="seed", columns="intervention.magnitude", values=fair)
    low, _ = query.t_interval((probe[0.8] - probe[0.5]).to_numpy())  # A2, paired by seed
    assert low > 0, probe
    table = query.inheritance(trials[trials["freeze_depth"] == "4"], fair, controls=["control"]).set_index("finetune.size")
    assert table.loc[128, "inheritance_ci_low"] > 0.1, table  # the size moderator
    per_seed = trials[(trials["freeze_depth"] == "4") & (trials["intervention.magnitude"] == 0.8)].pivot_table(
        index="seed", columns=["finetune.size", "paradigm"], values=fair)
    moderator = (per_seed[(128, "biased")] - per_seed[(128, "control")]) - (per_seed[(1024, "biased")]
                                                                          - per_seed[(1024, "control")])
    assert query.t_interval(moderator.to_numpy())[0] > 0, per_seed
