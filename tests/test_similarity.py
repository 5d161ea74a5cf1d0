"""``fairsweep cka``'s pairing of trials (orchestrator/similarity.py): which trials are compared with which, and
the errors that say what to write instead. The end-to-end run is tests/test_cka_cli.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.similarity import CKAError, _load_model, pair_trials, parse_selector


def _point(paradigm: str, freeze: object, seed: int, magnitude: float = 0.5) -> dict:
    return {"backbone": "cnn1d_paperb", "paradigm": paradigm, "intervention": "none", "magnitude": magnitude,
            "freeze_depth": freeze, "seed": seed, "finetune": {}}


POINTS = {f"{p}-{f}-{s}": _point(p, f, s) for p in ("simclr", "supervised") for f in ("full", [0, 2]) for s in (0, 1)}


def test_each_a_trial_pairs_with_the_b_trial_equal_on_every_other_axis_and_the_seed() -> None:
    pairs, unmatched = pair_trials(POINTS, {"paradigm": "simclr"}, {"paradigm": "supervised"})
    assert unmatched == 0
    assert sorted((a, b) for a, b, _ in pairs) == sorted(
        (f"simclr-{f}-{s}", f"supervised-{f}-{s}") for f in ("full", "[0, 2]") for s in (0, 1))
    shared = {a: values for a, _, values in pairs}
    assert shared["simclr-[0, 2]-1"] == {"backbone": "cnn1d_paperb", "finetune": "{}", "freeze_depth": "[0,2]",
                                        "intervention": "none", "magnitude": "0.5", "seed": "1"}


def test_selectors_may_name_several_axes_and_values_are_compared_as_written() -> None:
    a = parse_selector(["paradigm=simclr", "freeze_depth=[0, 2]"], "--a")
    b = parse_selector(["paradigm=supervised", "freeze_depth=full"], "--b")
    pairs, unmatched = pair_trials(POINTS, a, b)
    assert sorted((x, y) for x, y, _ in pairs) == [("simclr-[0, 2]-0", "supervised-full-0"),
                                                   ("simclr-[0, 2]-1", "supervised-full-1")]
    # a freezing set is one Freeze label however it is written: [2,0] on the command line is the point's [0, 2]
    unsorted, _ = pair_trials(POINTS, parse_selector(["paradigm=simclr", "freeze_depth=[2,0]"], "--a"), b)
    assert sorted((x, y) for x, y, _ in unsorted) == sorted((x, y) for x, y, _ in pairs)
    # intervention.magnitude is the param name users see; 0.50 is the magnitude 0.5
    both = {**POINTS, "extra": _point("simclr", "full", 0, magnitude=0.9)}
    pairs, unmatched = pair_trials(both, parse_selector(["intervention.magnitude=0.50", "paradigm=simclr"], "--a"),
                                   parse_selector(["paradigm=supervised", "magnitude=0.5"], "--b"))
    assert len(pairs) == 4 and unmatched == 0


def test_a_trial_without_partner_is_counted_not_paired() -> None:
    lonely = {**POINTS, "simclr-full-7": _point("simclr", "full", 7)}
    pairs, unmatched = pair_trials(lonely, {"paradigm": "simclr"}, {"paradigm": "supervised"})
    assert len(pairs) == 4 and unmatched == 1


@pytest.mark.parametrize("a,b,fragment", [
    ({"paradigm": "byol"}, {"paradigm": "supervised"}, "no finished trial of this sweep has --a paradigm=byol; "
                                                       "the sweep's values: paradigm: simclr, supervised"),
    ({"paradgm": "simclr"}, {"paradigm": "supervised"}, "['paradgm'], which are not axes"),
    ({"paradigm": "simclr", "seed": "0"}, {"paradigm": "supervised", "seed": "1"}, None),
    ({"paradigm": "simclr", "freeze_depth": "full"}, {"paradigm": "supervised"},
     "--b matches several trials for one --a trial (runs supervised-[0, 2]-0, supervised-full-0): they differ only in "
     "freeze_depth, named on one side only"),
    ({"paradigm": "simclr", "seed": "0"}, {"paradigm": "simclr", "seed": "0"}, "no trial of --a"),
])
def test_requests_that_pair_nothing_say_what_exists(a: dict, b: dict, fragment: str | None) -> None:
    if fragment is None:  # naming the seed on both sides pairs across seeds: allowed, and it pairs
        pairs, _ = pair_trials(POINTS, a, b)
        assert sorted((x, y) for x, y, _ in pairs) == [("simclr-[0, 2]-0", "supervised-[0, 2]-1"),
                                                       ("simclr-full-0", "supervised-full-1")]
        return
    with pytest.raises(CKAError) as err:
        pair_trials(POINTS, a, b)
    assert fragment in str(err.value)


@pytest.mark.parametrize("items,fragment", [
    (["paradigm"], "write AXIS=VALUE"),
    (["paradigm=simclr", "paradigm=byol"], "names paradigm twice"),
    ([], "--a is required"),
])
def test_selector_syntax_errors(items: list, fragment: str) -> None:
    with pytest.raises(CKAError, match=fragment):
        parse_selector(items, "--a")


def test_missing_weights_say_how_to_keep_them(tmp_path: Path) -> None:
    class NoWeights:  # a tracking client whose run logged predictions but no weights
        def list_artifacts(self, run_id: str, path: str) -> list:
            return []

    with pytest.raises(CKAError) as err:
        _load_model(NoWeights(), "run123", "cnn1d_paperb", (3, 32), tmp_path)
    assert "trial run run123 has no finetuned weights" in str(err.value)
    assert "tracking: {log_models: all}" in str(err.value)


def test_a_side_matching_several_trials_for_one_b_trial_is_refused_naming_the_axis() -> None:
    with pytest.raises(CKAError) as err:
        pair_trials(POINTS, parse_selector(["paradigm=supervised"], "--a"),
                    parse_selector(["paradigm=simclr", "freeze_depth=full"], "--b"))
    assert ("--a matches several trials for one --b trial (runs supervised-[0, 2]-0, supervised-full-0): they differ "
            "only in freeze_depth, which only --b names; add it to --a too (e.g. --a freeze_depth=full)") in str(err.value)


def test_a_side_trials_sharing_a_key_but_without_any_b_partner_are_only_unmatched() -> None:
    """Several A trials that no B trial matches are not ambiguous: they count as unmatched, and the pairs that
    exist are still compared."""
    points = {**POINTS, "simclr-full-5a": _point("simclr", "full", 5, 0.9), "simclr-full-5b": _point("simclr", "full",
                                                                                                      5, 0.9)}
    points["simclr-full-5b"]["finetune"] = {}  # the same key as 5a: a repeat with no supervised partner
    pairs, unmatched = pair_trials(points, {"paradigm": "simclr"}, {"paradigm": "supervised"})
    assert len(pairs) == 4 and unmatched == 2
