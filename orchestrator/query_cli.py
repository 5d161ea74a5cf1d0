"""``fairsweep pareto|best|compare``: the Python API's queries (orchestrator.api) from the shell.

Only argparse at import time: MLflow and pandas load when a command runs (the reason for the imports
inside functions here), so ``fairsweep --help`` stays instant. Bad input (unknown metric, sweep,
experiment; an unreachable server) raises a UserError naming what exists, within a few seconds; the
CLI's ``main`` prints it and exits 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any, Callable

from trainables.errors import UserError

__all__ = ["add_commands", "env_experiment"]

EXIT_OK = 0
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"


def env_experiment() -> str | None:
    """MLflow's own default experiment variable, honoured as users of MLflow expect: the experiment of a
    spec without ``experiment:`` and of a query without ``--experiment`` (empty counts as unset)."""
    return os.environ.get(EXPERIMENT_ENV) or None


def add_commands(sub: Any) -> None:
    """Register pareto, best and compare on the ``fairsweep`` subparsers."""
    p = sub.add_parser("pareto", help="the Pareto front of a sweep (seed means per configuration)")
    p.set_defaults(handler=_cmd_pareto)
    _common(p)
    p.add_argument("--per-trial", action="store_true", help="one row per trial instead of seed means per configuration")
    p.add_argument("--all", action="store_true", help="every row, with an on_front column")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="the front of the test metrics (default) or of the validation ones (val_ columns)")

    p = sub.add_parser("best", help="the least unfair configuration within a performance budget of the best, chosen "
                                    "on validation")
    p.set_defaults(handler=_cmd_best)
    _common(p)
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--max-drop", type=float, help="absolute drop in the performance metric (0.01 = one point)")
    budget.add_argument("--max-rel-drop", type=float, help="relative drop (0.01 = 1%% of the reference performance)")
    p.add_argument("--reference", action="append", metavar="AXIS=VALUE",
                   help="measure the budget from this configuration's best trial (repeatable), e.g. paradigm=supervised")
    _selection_flags(p)

    p = sub.add_parser("compare", help="per group of one axis: the best fairness within a performance budget")
    p.set_defaults(handler=_cmd_compare)
    _common(p)
    p.add_argument("--by", required=True,
                   help="the axis to group by, e.g. paradigm, freeze_depth, intervention.magnitude, finetune.size")
    p.add_argument("--reference", help="the group the relative change is measured against (default: the first)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--max-drop", type=float, help="absolute drop from the best trial (default 0.01)")
    budget.add_argument("--max-rel-drop", type=float, help="relative drop from the best trial")
    _selection_flags(p)


def _selection_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--per-trial", action="store_true",
                   help="choose among single trials instead of seed means per configuration (the default)")
    p.add_argument("--select-on", choices=("val", "test"), default="val",
                   help="the split the choice is made on (default val); the test metrics of the pick are reported. "
                        "Choosing on test reports an optimistically biased value")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", help="the sweep's name")
    p.add_argument("--experiment", help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME, else the sweep's name)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    p.add_argument("--perf", help="performance metric (default: the sweep's objective)")
    p.add_argument("--fairness", help="unfairness metric (default: the sweep's objective)")
    p.add_argument("--filter", action="append", metavar="COLUMN=VALUE", help="keep only matching trials (repeatable)")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table",
                   help="table: for reading (the default); csv; json: a list of records, for programs")


def _pairs(items: list[str] | None, flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"{flag} {item!r}: write COLUMN=VALUE, e.g. paradigm=supervised")
        out.setdefault(key, [])
        out[key].append(value)  # type: ignore[union-attr]
    return {k: v[0] if len(v) == 1 else v for k, v in out.items()}  # type: ignore[index,misc]


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    """The options every query takes (orchestrator.api's keyword arguments), from the common flags."""
    return {"experiment": args.experiment, "tracking_uri": args.tracking_uri, "perf": args.perf,
            "fairness": args.fairness, "filters": _pairs(args.filter, "--filter")}


# An unreachable or failing tracking server surfaces as MLflow's or requests' own exceptions, which this
# module cannot import without loading MLflow at startup; they are known by name.
_STORE_FAILURES = ("MlflowException", "ConnectionError", "RestException", "Timeout", "ReadTimeout", "ConnectTimeout",
                   "MaxRetryError", "OperationalError")


def _run(args: argparse.Namespace, ask: Callable[[Any], Any]) -> int:
    """Print the table ``ask(orchestrator.api)`` returns; a tracking store that fails is a StoreError (exit 2)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a question answers in seconds, not minutes
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    from orchestrator import api
    from orchestrator.store import StoreError

    try:
        table = ask(api)
    except Exception as exc:
        if type(exc).__name__ in _STORE_FAILURES:
            first = str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__
            raise StoreError(f"tracking store error: {first}") from exc
        raise
    _print(table, args.format)
    return EXIT_OK


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"  # JSON has no infinity; rel_change against a fair reference
    return value


def _print(table, fmt: str) -> None:
    if fmt == "json":
        records = [{k: _plain(v) for k, v in rec.items()} for rec in table.to_dict(orient="records")]
        print(json.dumps(records, indent=1))
    elif fmt == "csv":
        print(table.to_csv(index=False), end="")
    elif table.empty:
        print("(no rows)")
    else:
        shown = table.drop(columns=[c for c in ("run_ids", "trial_keys") if c in table])
        print(shown.to_string(index=False))


def _cmd_pareto(args: argparse.Namespace) -> int:
    return _run(args, lambda api: api.front(args.sweep, per_trial=args.per_trial, all_rows=args.all, split=args.split,
                                            **_flags(args)))


def _cmd_best(args: argparse.Namespace) -> int:
    return _run(args, lambda api: api.best(args.sweep, max_drop=args.max_drop, max_rel_drop=args.max_rel_drop,
                                           reference=_pairs(args.reference, "--reference") or None,
                                           per_trial=args.per_trial, select_on=args.select_on, **_flags(args)))


def _cmd_compare(args: argparse.Namespace) -> int:
    return _run(args, lambda api: api.compare(args.sweep, by=args.by, reference=args.reference, max_drop=args.max_drop,
                                              max_rel_drop=args.max_rel_drop, per_trial=args.per_trial,
                                              select_on=args.select_on, **_flags(args)))
