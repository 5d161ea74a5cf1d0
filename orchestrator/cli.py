"""The ``fairsweep`` command. Heavy libraries (Ray, MLflow, torch, timm) are imported only by the
subcommands that need them, so ``--help`` and ``validate`` answer at once.

Exit codes: 0 success, 1 a sweep that ran but had failed trials, 2 bad input or an environment the user
can fix (spec, names, paths, an unreachable or unusable tracking store, a sweep another driver runs).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

__all__ = ["main"]

EXIT_OK, EXIT_TRIALS_FAILED, EXIT_USAGE = 0, 1, 2


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    """Flags of the commands that run trials (launch, resume)."""
    p.add_argument("--max-concurrent", type=int, help="at most this many trials at once")
    p.add_argument("--quiet", action="store_true", help="no Tune progress table")
    _add_target_flags(p)


def _add_target_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray instance)")
    p.add_argument("--storage", help="Tune storage path, shared storage on a cluster (default: ./fairsweep_results)")
    p.add_argument("--cache-dir", help="pretraining cache (default: STORAGE/_pretrain_cache)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fairsweep", description="Sweeps of pretraining x interventions x freezing on "
                                 "Ray Tune, tracked in MLflow with a Pareto front of performance vs fairness.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("launch", help="run a sweep file end to end")
    p.set_defaults(handler=_cmd_launch)
    p.add_argument("spec", help="path to a sweep YAML file, e.g. sweeps/quickstart.yaml")
    p.add_argument("--dry-run", action="store_true", help="print the plan and start nothing")
    _add_run_flags(p)

    p = sub.add_parser("resume", help="continue an interrupted sweep from its storage path")
    p.set_defaults(handler=_cmd_resume)
    p.add_argument("name", help="the sweep's name (its folder under --storage)")
    p.add_argument("--retry-errored", action="store_true", help="also run errored trials again (from their last checkpoint)")
    _add_run_flags(p)

    p = sub.add_parser("status", help="finished / running / pending / errored trials and the front size")
    p.set_defaults(handler=_cmd_status)
    p.add_argument("name")
    p.add_argument("--storage")
    p.add_argument("--tracking-uri")

    p = sub.add_parser("report", help="figures and a Markdown summary of a sweep, also logged to its parent run")
    p.set_defaults(handler=_cmd_report)
    p.add_argument("sweep", help="the sweep's name")
    p.add_argument("--out", required=True, help="folder for the PNGs and summary.md")
    p.add_argument("--experiment", help="MLflow experiment, where it differs from the sweep's name")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    p.add_argument("--perf", help="performance metric (default: the sweep's objective)")
    p.add_argument("--fairness", help="unfairness metric (default: the sweep's objective)")
    p.add_argument("--max-drop", type=float, default=0.01, help="budget for the summary's 'fairest within' line")
    p.add_argument("--select-on", choices=("val", "test"), default="val",
                   help="the split the 'fairest within' pick is made on (default val; its test metrics are reported)")

    p = sub.add_parser("paradigms", help="list the pretraining paradigms and their options")
    p.set_defaults(handler=lambda args: _print_paradigms())

    from orchestrator import query_cli

    query_cli.add_commands(sub)

    p = sub.add_parser("validate", help="check a sweep file and print its plan")
    p.set_defaults(handler=_cmd_validate)
    p.add_argument("spec")

    p = sub.add_parser("cache", help="list or clear the pretraining cache")
    p.set_defaults(handler=_cmd_cache)
    p.add_argument("action", choices=("list", "clear"))
    p.add_argument("--storage")
    p.add_argument("--cache-dir")
    p.add_argument("--key", action="append", help="only this key (repeatable; clear only)")
    return ap


def _fail(message: str) -> int:
    print(f"fairsweep: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _plan(path: str):
    from orchestrator.plan import build_plan
    from orchestrator.spec import load_spec

    return build_plan(load_spec(path))


def _launch_options(args: argparse.Namespace):
    from orchestrator.launch import LaunchOptions

    return LaunchOptions(tracking_uri=args.tracking_uri, address=args.address, storage=args.storage,
                         cache_dir=args.cache_dir, max_concurrent_trials=args.max_concurrent, verbose=0 if args.quiet else 1)


def _cmd_launch(args: argparse.Namespace) -> int:
    from orchestrator.launch import LaunchError, launch, resolve_tracking_uri
    from orchestrator.spec import SpecError
    from orchestrator.store import StoreError, check_store

    try:
        if not args.dry_run:  # in seconds, before the plan loads torch and the launch starts Ray
            check_store(resolve_tracking_uri(args.tracking_uri), create=True)
        plan = _plan(args.spec)
        if args.dry_run:
            print(plan.summary())
            return EXIT_OK
        result = launch(plan, _launch_options(args))
    except SpecError as exc:
        return _fail(f"{args.spec}: {exc}")
    except (LaunchError, StoreError) as exc:
        return _fail(str(exc))
    return _print_summary(result, args)


def _cmd_resume(args: argparse.Namespace) -> int:
    from orchestrator.launch import LaunchError, resume
    from orchestrator.spec import SpecError
    from orchestrator.store import StoreError

    try:
        result = resume(args.name, _launch_options(args), retry_errored=args.retry_errored)
    except (LaunchError, SpecError, StoreError) as exc:
        return _fail(str(exc))
    return _print_summary(result, args)


def _cmd_status(args: argparse.Namespace) -> int:
    from orchestrator.launch import LaunchError
    from orchestrator.status import sweep_status
    from orchestrator.store import StoreError

    _fail_fast_http()
    try:
        print(sweep_status(args.name, args.storage, args.tracking_uri).render())
    except (LaunchError, StoreError) as exc:
        return _fail(str(exc))
    return EXIT_OK


def _fail_fast_http() -> None:
    """Read-only commands answer in seconds: MLflow's default retries an unreachable server for minutes
    (the probe catches a server that is down; these bound one that stops answering)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def _print_summary(result, args: argparse.Namespace) -> int:
    """Print the front and what to do next; returns the exit code."""
    plan = result.plan
    perf, fair = plan.spec.objectives.performance, plan.spec.objectives.fairness
    front = result.front[result.front["on_front"]] if not result.front.empty else result.front
    cols = ["backbone", "paradigm", "intervention.kind", "intervention.magnitude", "freeze_depth", "n_seeds",
            *(f"{m}{x}" for m in (perf, fair) for x in ("", "_std", "_ci_low", "_ci_high"))]
    print(f"\nsweep {plan.spec.name!r}: {result.finished} trials finished, {len(result.failed)} failed; "
          f"{len(front)} configurations on the Pareto front ({perf} max, {fair} min; test split, means over "
          f"seeds with their sd and 95 % t-interval):")
    if not front.empty:
        print(front[[c for c in cols if c in front]].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    where = f" --storage {args.storage}" if args.storage else ""
    if result.failed:
        print(f"failed trial runs: {', '.join(result.failed)} (see the fairsweep.error tag of each)")
        print(f"retry them with: fairsweep resume {plan.spec.name}{where} --retry-errored")
    print(f"\nMLflow: parent run {result.parent_run_id} in experiment {plan.spec.experiment!r}")
    print(f"open it with: mlflow ui --backend-store-uri {result.tracking_uri}")
    if result.interrupted:
        print(f"\ninterrupted before every trial ended; continue with: fairsweep resume {plan.spec.name}{where}", file=sys.stderr)
        return 130
    return EXIT_TRIALS_FAILED if result.failed else EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from orchestrator.launch import LaunchError, resolve_tracking_uri
    from orchestrator.query import SweepNotFoundError
    from orchestrator.report import write_report
    from orchestrator.store import StoreError, open_client

    _fail_fast_http()
    try:
        client = open_client(resolve_tracking_uri(args.tracking_uri))
        report = write_report(client, args.sweep, Path(args.out), experiment=args.experiment, performance=args.perf,
                              fairness=args.fairness, max_drop=args.max_drop, select_on=args.select_on)
    except (LaunchError, StoreError, SweepNotFoundError, ValueError) as exc:
        return _fail(str(exc))
    print(f"sweep {args.sweep!r}: {report.n_trials} trials, {report.front_size} configurations on the front")
    for f in report.files:
        print(f"  {f}")
    print(f"logged under report/ of parent run {report.parent_run_id}")
    return EXIT_OK


def _print_paradigms() -> int:
    from trainables.pretrain import describe_paradigms

    print(describe_paradigms())
    return EXIT_OK


def _cmd_validate(args: argparse.Namespace) -> int:
    from orchestrator.spec import SpecError

    try:
        plan = _plan(args.spec)
    except SpecError as exc:
        return _fail(f"{args.spec}: {exc}")
    print(plan.summary())
    return EXIT_OK


def _cmd_cache(args: argparse.Namespace) -> int:
    from orchestrator.launch import CACHE_DIRNAME, LaunchError, resolve_storage
    from trainables.pretrain import PretrainCache

    try:
        root = args.cache_dir or os.path.join(resolve_storage(args.storage), CACHE_DIRNAME)
    except LaunchError as exc:
        return _fail(str(exc))
    cache = PretrainCache(root)
    if args.action == "list":
        entries = cache.entries()
        print(f"{len(entries)} entries in {root}")
        for e in entries:
            print(f"  {e['key']}  {e['status']:<8} {e.get('backbone') or '?':<24} {e.get('paradigm') or '?':<12} "
                  f"{e['bytes'] / 1e6:.1f} MB  {e.get('created') or ''}")
        return EXIT_OK
    removed = cache.clear(args.key)
    print(f"removed {len(removed)} entries from {root}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from orchestrator import raylocal  # before any command imports ray: a local Ray listens on 127.0.0.1 only

    raylocal.loopback_default(getattr(args, "address", None))
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("fairsweep: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
