"""``fairsweep cka``: paper B's representation analysis on a finished sweep.

Paper B compares an SSL-finetuned model with a supervised one layer by layer (linear CKA), on the
examples of one demographic group at a time, and reads the difference between its best- and its
worst-performing group (``representation similarity.ipynb`` in Nokia-Bell-Labs/SSLfairness). Here:

1. the trials of side A (``--a paradigm=simclr``) are paired with those of side B (``--b
   paradigm=supervised``) that share every other axis value and the seed (their ``fairsweep.point``);
2. both models of a pair are rebuilt from their finetuned weights (the run artifact
   ``weights/finetuned.safetensors``, logged when the sweep file sets ``tracking: {log_models: all}``;
   weights only, nothing is unpickled) and run on the test split;
3. the groups of the attribute are ranked by AUROC on the test split, averaged over both models of
   every pair (paper B's main performance metric; threshold-free, so no decision rule enters); for each
   group, the CKA of every layer group of A with every layer group of B is computed on the group's test
   examples (at most ``max_examples`` of them, the first in test order);
4. a CSV (every pair, group and layer pair) and a PNG (per configuration, seeds averaged: the best and
   the worst group side by side) are written and logged to the sweep's parent run under ``cka/``.

The math is ``trainables/cka.py``; this module reads MLflow and the data.

torch (and ``trainables.loop`` and ``trainables.data``, which import it), safetensors, scipy and matplotlib are
imported inside the functions that use them: ``fairsweep cka`` imports this module to parse its selectors and
refuses a bad one before any of them loads.
"""
from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import yaml

from orchestrator import query
from orchestrator.mlflow_runs import TAGS, WEIGHTS_ARTIFACT, run_filter, search_runs
from orchestrator.spec import parse_spec
from trainables import backbones
from trainables.cka import cka_matrix, layer_group_outputs
from trainables.errors import UserError
from trainables.pretrain import model_view
from trainables.schema import SchemaError
from trainables.trial import Freeze

__all__ = ["CKAReport", "CKAError", "parse_selector", "pair_trials", "compare_representations"]

_ALIASES = {"intervention.kind": "intervention", "intervention.magnitude": "magnitude"}  # param names -> point keys


class CKAError(UserError, ValueError):
    """A CKA request that cannot be answered as asked (selectors, pairs, weights, attribute); says what to do."""


@dataclass(frozen=True)
class CKAReport:
    table: pd.DataFrame  # one row per (pair, group, layer of A, layer of B)
    files: tuple[Path, ...]  # the CSV and the PNG
    parent_run_id: str
    n_pairs: int
    best_group: str
    worst_group: str
    unmatched: int  # side-A trials with no side-B partner


def parse_selector(items: Sequence[str] | None, flag: str) -> dict[str, str]:
    """``["paradigm=simclr", ...]`` -> ``{"paradigm": "simclr", ...}`` (point keys; ``intervention.kind``
    and ``intervention.magnitude`` are accepted for ``intervention`` and ``magnitude``)."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise CKAError(f"{flag} {item!r}: write AXIS=VALUE, e.g. {flag} paradigm=simclr")
        key = _ALIASES.get(key, key)
        if key in out and out[key] != value:
            raise CKAError(f"{flag} names {key} twice ({out[key]!r} and {value!r}); give each axis once")
        out[key] = value
    if not out:
        raise CKAError(f"{flag} is required: the axis values of one side, e.g. {flag} paradigm=simclr")
    return out


def _label(key: str, value: Any) -> str:
    """One text form per axis value, whether it comes from a point (JSON) or the command line."""
    if key == "magnitude":
        try:
            return repr(float(value))
        except (TypeError, ValueError):
            return str(value)
    if key == "freeze_depth":  # the point's [0, 2] and the command line's [2,0] are one label
        try:
            return Freeze.from_label(value).label()
        except SchemaError:
            return str(value)
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True)
    return str(value).replace(" ", "")


def pair_trials(points: Mapping[str, Mapping[str, Any]], a: Mapping[str, str],
                b: Mapping[str, str]) -> tuple[list[tuple[str, str, dict[str, str]]], int]:
    """Pairs (run of A, run of B, the values they share) of trials equal on every axis the selectors do not
    name, the seed included; and the number of A trials left without a partner. ``points``: run id -> point."""
    named = set(a) | set(b)
    keys = sorted({k for p in points.values() for k in p})
    unknown = sorted(named - set(keys))
    if unknown:
        raise CKAError(f"--a/--b name {unknown}, which are not axes of this sweep's trials; axes: {', '.join(keys)} "
                       "(also intervention.kind, intervention.magnitude)")

    def side(sel: Mapping[str, str]) -> dict[str, str]:
        return {r: p for r, p in points.items() if all(_label(k, p.get(k)) == _label(k, v) for k, v in sel.items())}

    def rest(point: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
        return tuple((k, _label(k, point.get(k))) for k in keys if k not in named)

    runs_a, runs_b = side(a), side(b)
    for flag, sel, runs in (("--a", a, runs_a), ("--b", b, runs_b)):
        if not runs:
            found = "; ".join(f"{k}: " + ", ".join(sorted({_label(k, p.get(k)) for p in points.values()})) for k in sel)
            asked = " ".join(f"{k}={v}" for k, v in sel.items())
            raise CKAError(f"no finished trial of this sweep has {flag} {asked}; the sweep's values: {found}")
    by_rest: dict[tuple, list[str]] = {}
    for run_id, point in runs_b.items():
        by_rest.setdefault(rest(point), []).append(run_id)
    one_sided = sorted(set(a) ^ set(b))
    for candidates in by_rest.values():
        if len(candidates) > 1:
            raise CKAError(f"--b matches several trials for one --a trial (runs {', '.join(sorted(candidates)[:4])}): "
                           f"they differ only in {', '.join(one_sided) or 'an axis'}, named on one side only; name it "
                           "on both sides (e.g. --a freeze_depth=1 --b freeze_depth=full)")
    by_rest_a: dict[tuple, list[str]] = {}
    for run_id, point in runs_a.items():
        by_rest_a.setdefault(rest(point), []).append(run_id)
    for key, candidates in by_rest_a.items():  # several A trials would share one B partner: as ambiguous
        if len(candidates) > 1 and key in by_rest:
            only_b = sorted(set(b) - set(a))
            fix = (f"they differ only in {', '.join(only_b)}, which only --b names; add it to --a too (e.g. --a "
                   f"{' '.join(f'{k}={b[k]}' for k in only_b)})" if only_b else
                   "they share every axis value; name an axis that tells them apart on both sides")
            raise CKAError(f"--a matches several trials for one --b trial (runs {', '.join(sorted(candidates)[:4])}): "
                           + fix)
    pairs = [(ra, by_rest[rest(p)][0], dict(rest(p))) for ra, p in sorted(runs_a.items(), key=lambda kv: rest(kv[1]))
             if rest(p) in by_rest and by_rest[rest(p)][0] != ra]
    if not pairs:
        raise CKAError(f"no trial of --a {a} has a --b {b} partner with the same other axis values and seed; name "
                       "only the axes that differ between the two sides (e.g. --a paradigm=simclr --b paradigm=supervised)")
    return pairs, len(runs_a) - len(pairs)


def _load_model(client: Any, run_id: str, backbone: str, input_shape: tuple[int, ...], folder: Path) -> Any:
    """The trial's finetuned model from its weights artifact (safetensors: weights only)."""
    from safetensors.torch import load_file

    names = {a.path for a in client.list_artifacts(run_id, WEIGHTS_ARTIFACT.rsplit("/", 1)[0])}
    if WEIGHTS_ARTIFACT not in names:
        raise CKAError(f"trial run {run_id} has no finetuned weights (artifact {WEIGHTS_ARTIFACT}); CKA needs every "
                       "compared trial's weights: add `tracking: {log_models: all}` to the sweep file and launch it "
                       "again under a new name (finished trials keep what they logged)")
    path = client.download_artifacts(run_id, WEIGHTS_ARTIFACT, str(folder / run_id))
    model = backbones.create_backbone(backbone, num_classes=2, input_shape=input_shape)
    model.load_state_dict(load_file(path))
    return model.eval()


def _predict(model: Any, x: Any, batch_size: int, device: Any) -> np.ndarray:
    import torch

    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            logits = model(x[start:start + batch_size].to(device).float())
            out.append(torch.softmax(logits.float(), dim=1)[:, 1].cpu())
    return torch.cat(out).numpy()


def _group_auroc(labels: np.ndarray, scores: np.ndarray, codes: np.ndarray, k: int) -> np.ndarray:
    """AUROC within each group (Mann-Whitney U over ranks, ties averaged); NaN for a group with one label."""
    from scipy.stats import rankdata

    out = np.full(k, np.nan)
    for g in range(k):
        y, s = labels[codes == g] == 1, scores[codes == g]
        n_pos, n_neg = int(y.sum()), int((~y).sum())
        if n_pos and n_neg:
            out[g] = (rankdata(s)[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return out


def compare_representations(client: Any, sweep: str, a: Mapping[str, str], b: Mapping[str, str], out: Path, *,
                            experiment: str | None = None, attribute: str | None = None, max_examples: int = 500,
                            debiased: bool = True, log_to_mlflow: bool = True) -> CKAReport:
    """Pair the trials, compute the CKA matrices per group and write (and log) the CSV and the PNG."""
    import torch

    from trainables import loop
    from trainables.data import build_dataset

    if max_examples < 4:
        raise CKAError(f"--max-examples {max_examples}: the unbiased CKA needs at least 4 examples per group")
    parent = query.parent_run(client, sweep, experiment)
    runs = list(search_runs(client, [parent.info.experiment_id], run_filter(sweep=sweep, kind="trial", status="FINISHED")))
    points = {r.info.run_id: json.loads(r.data.tags[TAGS.POINT]) for r in runs if TAGS.POINT in r.data.tags}
    pairs, unmatched = pair_trials(points, a, b)
    with tempfile.TemporaryDirectory() as tmp:
        spec = parse_spec(yaml.safe_load(Path(client.download_artifacts(parent.info.run_id, "spec.yaml", tmp)).read_text()))
        dataset = build_dataset(spec.dataset.name, spec.dataset.options)
        meta = dataset.meta("test")
        attribute = attribute or dataset.primary
        if attribute not in meta.attributes:
            raise CKAError(f"--by {attribute!r}: the dataset's sensitive attributes are {', '.join(meta.attributes)}")
        codes = np.asarray(meta.attributes[attribute])
        names = dataset.group_names.get(attribute) or tuple(str(c) for c in range(int(codes.max()) + 1))
        rows_of = [np.flatnonzero(codes == g)[:max_examples] for g in range(len(names))]
        chosen = np.concatenate(rows_of)
        device = loop.select_device()
        views: dict[str, tuple[Any, Any]] = {}  # backbone -> (its view of the data, the test inputs)

        def features(run_id: str, backbone: str) -> tuple[list[np.ndarray], list[str], np.ndarray]:
            if backbone not in views:  # folder images: the backbone's own preprocessing
                view = model_view(dataset, backbone)
                views[backbone] = (view, view.inputs("test"))
            view, x = views[backbone]
            model = _load_model(client, run_id, backbone, tuple(view.input_shape), Path(tmp)).to(device)
            auc = _group_auroc(meta.labels, _predict(model, x, 256, device), codes, len(names))
            outputs, _ = layer_group_outputs(model, x[torch.from_numpy(chosen)], device=device)
            return outputs, _layer_names(model), auc

        records, aurocs = [], []
        for run_a, run_b, shared in pairs:
            feats_a, layers_a, auc_a = features(run_a, points[run_a]["backbone"])
            feats_b, layers_b, auc_b = features(run_b, points[run_b]["backbone"])
            aurocs.append((auc_a + auc_b) / 2)
            start = 0
            for g, rows in enumerate(rows_of):
                part = slice(start, start + len(rows))
                start += len(rows)
                if len(rows) < 4:
                    continue  # too few examples of this group in the test split for the unbiased estimator
                m = cka_matrix([f[part] for f in feats_a], [f[part] for f in feats_b], debiased=debiased)
                for i, la in enumerate(layers_a):
                    for j, lb in enumerate(layers_b):
                        records.append({"run_a": run_a, "run_b": run_b, **shared, "attribute": attribute,
                                        "group": str(names[g]), "n_examples": len(rows), "auroc_a": auc_a[g],
                                        "auroc_b": auc_b[g], "layer_a": la, "layer_b": lb, "cka": m[i, j]})
        mean_auroc = np.nanmean(np.array(aurocs), axis=0)
        valid = [g for g in range(len(names)) if np.isfinite(mean_auroc[g]) and len(rows_of[g]) >= 4]
        if len(valid) < 2:
            raise CKAError(f"--by {attribute!r}: fewer than two of its groups have both labels and 4 test examples; "
                           "pick another attribute or a larger test split")
        best = str(names[max(valid, key=lambda g: mean_auroc[g])])
        worst = str(names[min(valid, key=lambda g: mean_auroc[g])])
        table = pd.DataFrame(records)
        table["rank"] = np.select([table["group"] == best, table["group"] == worst], ["best", "worst"], "")
        out.mkdir(parents=True, exist_ok=True)
        stem = "cka_" + "_vs_".join("-".join(f"{k}={v}" for k, v in sorted(s.items())) for s in (a, b))
        stem = "".join(c if c.isalnum() or c in "=-_." else "_" for c in stem) + f"_by_{attribute}"
        csv, png = out / f"{stem}.csv", out / f"{stem}.png"
        table.to_csv(csv, index=False)
        _heatmaps(table, a, b, attribute, best, worst).savefig(png, bbox_inches="tight")
        if log_to_mlflow:
            for f in (csv, png):
                client.log_artifact(parent.info.run_id, str(f), artifact_path="cka")
    return CKAReport(table, (csv, png), parent.info.run_id, len(pairs), best, worst, unmatched)


def _layer_names(model: Any) -> list[str]:
    return list(backbones.layer_groups(model).names)


def _natural(value: str) -> tuple:
    """Rows in reading order: numbers by value, then explicit sets like [0,2], then words (full, linear)."""
    try:
        return (0, float(value), value)
    except ValueError:
        return (1 if value.startswith("[") else 2, 0.0, value)


def _heatmaps(table: pd.DataFrame, a: Mapping[str, str], b: Mapping[str, str], attribute: str, best: str,
              worst: str) -> Any:
    """Per configuration (the shared axes without the seed; seeds averaged), the best and the worst group's
    layer-by-layer CKA side by side, as paper B draws them (A's layers bottom to top, B's left to right)."""
    from matplotlib.figure import Figure

    fixed = {"run_a", "run_b", "seed", "attribute", "group", "n_examples", "auroc_a", "auroc_b", "layer_a", "layer_b",
             "cka", "rank"}
    config_cols = [c for c in table.columns if c not in fixed and table[c].nunique() > 1]  # what tells the rows apart
    configs = table[config_cols].drop_duplicates().to_dict("records") if config_cols else [{}]
    configs.sort(key=lambda config: [_natural(str(config[c])) for c in config_cols])
    layers_a = list(dict.fromkeys(table["layer_a"]))
    layers_b = list(dict.fromkeys(table["layer_b"]))
    width, height = 1.5 + 2.4 * len(layers_b), (1.4 + 0.8 * len(layers_a)) * len(configs)
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")  # not pyplot: a notebook's backend stays
    axes = fig.subplots(len(configs), 2, squeeze=False)
    side = lambda sel: " ".join(f"{k}={v}" for k, v in sel.items())  # noqa: E731
    for r, config in enumerate(configs):
        part = table
        for k, v in config.items():
            part = part[part[k] == v]
        for c, group in enumerate((best, worst)):
            cell = part[part["group"] == group]
            grid = cell.pivot_table(index="layer_a", columns="layer_b", values="cka", aggfunc="mean")
            grid = grid.reindex(index=layers_a, columns=layers_b)
            ax = axes[r][c]
            im = ax.imshow(grid.to_numpy(float), vmin=0, vmax=1, cmap="viridis", origin="lower")
            for i in range(len(layers_a)):
                for j in range(len(layers_b)):
                    value = grid.iat[i, j]
                    if not math.isnan(value):
                        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                                color="black" if value > 0.5 else "white")
            ax.set_xticks(range(len(layers_b)), layers_b, fontsize=7, rotation=30)
            ax.set_yticks(range(len(layers_a)), layers_a, fontsize=7)
            if r == len(configs) - 1:
                ax.set_xlabel(side(b), fontsize=8)
            if c == 0:
                ax.set_ylabel(side(a), fontsize=8)
            what = "best" if c == 0 else "worst"
            auc = (f"AUROC {','.join(a.values())} {cell['auroc_a'].mean():.3f}, {','.join(b.values())} "
                   f"{cell['auroc_b'].mean():.3f}" if len(cell) else "no examples")
            head = ", ".join(f"{k}={v}" for k, v in config.items())
            ax.set_title("\n".join(t for t in (head, f"{what} group {attribute}={group}", auc) if t), fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.6, label="linear CKA")
    return fig
