# PYTHON_ARGCOMPLETE_OK  (argcomplete's marker: tab completion, see README "Shell completion")
"""The ``fairsweep`` command. Heavy libraries (Ray, MLflow, pandas, torch, timm) are imported only by
the subcommands that need them, inside them, so ``--help`` and ``validate`` answer at once: that is the
reason for every import inside a function of this module.

Exit codes: 0 success, 1 a sweep that ran but had failed trials, 2 bad input or an environment the user
can fix (spec, names, paths, an unreachable or unusable tracking store, a sweep another driver runs), and
no sweep was started; 130 interrupted (resume it). ``fairsweep --help`` lists them (``_EPILOG``). Errors
become exit codes in one place, ``main``: a ``UserError`` (trainables/errors.py) prints its message and
exits 2; any other exception is a bug and keeps its traceback (exit 1).
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import sys
import threading
from typing import Any, Iterator, NoReturn, Sequence

from trainables.errors import UserError

__all__ = ["main", "run"]

EXIT_OK, EXIT_TRIALS_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

_EPILOG = """\
exit codes:
  0    done
  1    the sweep ran but some trials failed (retry them: fairsweep resume NAME --retry-errored), or
       fairsweep itself failed: a traceback follows (a bug; please report it)
  2    bad input or an environment to fix (spec, names, paths, tracking or study store, a sweep
       another driver runs, cache clear not confirmed); no sweep was started
  130  interrupted (Ctrl-C); continue with: fairsweep resume NAME

environment:
  MLFLOW_TRACKING_URI     default of --tracking-uri (else sqlite:///mlflow.db in this folder)
  MLFLOW_EXPERIMENT_NAME  MLflow experiment of a spec without `experiment:`, and the default of
                          --experiment (spec `experiment:` > MLFLOW_EXPERIMENT_NAME > the sweep's name)
  RAY_ADDRESS             default of --address (else a local Ray listening on 127.0.0.1)

a command's own flags: fairsweep COMMAND --help
"""


def _version() -> str:
    """The installed package's version; pyproject.toml's when the source tree runs uninstalled."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fairsweep")
    except PackageNotFoundError:
        import tomllib
        from pathlib import Path

        try:
            with open(Path(__file__).resolve().parent.parent / "pyproject.toml", "rb") as f:
                return str(tomllib.load(f)["project"]["version"])
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


class _VersionAction(argparse.Action):
    """``--version``, looked up only when asked (argparse's own needs the string when the parser is built)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0,
                         help="print fairsweep's version and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values, option_string=None) -> None:
        print(f"fairsweep {_version()}")
        parser.exit()


def _add_format(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--format", choices=("table", "json"), default="table",
                   help=f"table: for reading (the default); json: {what}, for programs")


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    """Flags of the commands that run trials (launch, resume)."""
    p.add_argument("--max-concurrent", type=int, help="at most this many trials at once")
    p.add_argument("--quiet", action="store_true", help="no fairsweep progress lines")
    p.add_argument("--verbose", action="store_true",
                   help="also show Tune's tables (status, each trial's config and results) and the trials' own output")
    p.add_argument("--dashboard", action="store_true",
                   help="start Ray's dashboard (a local Ray serves it on http://127.0.0.1:8265)")
    _add_target_flags(p)


def _add_target_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray instance)")
    p.add_argument("--storage", help="Tune storage path, shared storage on a cluster (default: ./fairsweep_results)")
    p.add_argument("--cache-dir", help="pretraining cache (default: STORAGE/_pretrain_cache)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fairsweep", description="Sweeps of pretraining x interventions x freezing on "
                                 "Ray Tune, tracked in MLflow with a Pareto front of performance vs fairness.",
                                 epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action=_VersionAction)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    p.add_argument("name", help="the sweep's name (its folder under --storage)")
    p.add_argument("--storage", help="the Tune storage path the sweep was launched with (default: ./fairsweep_results)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the one the sweep was launched with)")
    _add_format(p, "one record of the counts, the driver's state and the resume command")

    p = sub.add_parser("report", help="figures and a Markdown summary of a sweep, also logged to its parent run")
    p.set_defaults(handler=_cmd_report)
    p.add_argument("sweep", help="the sweep's name")
    p.add_argument("--out", required=True, help="folder for the PNGs and summary.md")
    p.add_argument("--experiment", help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME, else the sweep's name)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    p.add_argument("--perf", help="performance metric (default: the sweep's objective)")
    p.add_argument("--fairness", help="unfairness metric (default: the sweep's objective)")
    p.add_argument("--max-drop", type=float, default=0.01, help="budget for the summary's 'fairest within' line")
    p.add_argument("--select-on", choices=("val", "test"), default="val",
                   help="the split the 'fairest within' pick is made on (default val; its test metrics are reported)")

    p = sub.add_parser("cka", help="paper B's layer-by-layer CKA between matched trials, per group of an attribute")
    p.set_defaults(handler=_cmd_cka)
    p.add_argument("sweep", help="the sweep's name (its trials must have kept their weights: tracking.log_models: all)")
    p.add_argument("--a", action="append", required=True, metavar="AXIS=VALUE",
                   help="the axis values of one side, e.g. paradigm=simclr (repeatable)")
    p.add_argument("--b", action="append", required=True, metavar="AXIS=VALUE",
                   help="the other side, e.g. paradigm=supervised; each A trial is paired with the B trial that has "
                        "the same values on every other axis and the same seed")
    p.add_argument("--by", metavar="ATTR", help="sensitive attribute whose groups are compared (default: the dataset's "
                                                "primary); the best- and worst-performing groups are drawn")
    p.add_argument("--out", default=".", help="folder for the PNG and the CSV (default: here)")
    p.add_argument("--max-examples", type=int, default=500, help="test examples per group at most (default 500)")
    p.add_argument("--estimator", choices=("debiased", "biased"), default="debiased",
                   help="HSIC estimator: debiased (paper B's, the default) or the plug-in one")
    p.add_argument("--experiment", help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME, else the sweep's name)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")

    p = sub.add_parser("paradigms", help="list the pretraining paradigms and their options")
    p.set_defaults(handler=_print_paradigms)
    _add_format(p, "a list of paradigms, each with its options, defaults and bounds")

    from orchestrator import query_cli

    query_cli.add_commands(sub)

    p = sub.add_parser("validate", help="check a sweep file and print its plan")
    p.set_defaults(handler=_cmd_validate)
    p.add_argument("spec", help="path to a sweep YAML file, e.g. sweeps/quickstart.yaml")
    _add_format(p, "one record of the plan: the spec's settings, the pretraining jobs and every grid trial")

    p = sub.add_parser("schema", help="print the sweep file's JSON Schema (docs/sweep.schema.json), with every "
                                      "registered dataset's and paradigm's options, for editors to complete and check")
    p.set_defaults(handler=_cmd_schema)

    p = sub.add_parser("cache", help="list or clear the pretraining cache")
    p.set_defaults(handler=_cmd_cache)
    p.add_argument("action", choices=("list", "clear"),
                   help="list: every entry with its status and size; clear: delete entries (all of them unless --key)")
    p.add_argument("--storage", help="Tune storage path whose cache to use (default: ./fairsweep_results)")
    p.add_argument("--cache-dir", help="the cache folder itself (default: STORAGE/_pretrain_cache)")
    p.add_argument("--key", action="append", help="only this key (repeatable; clear only)")
    p.add_argument("--yes", "-y", action="store_true",
                   help="clear without asking (needed when clearing every entry from a script or CI, where no one "
                        "can answer)")
    _add_format(p, "list only: a list of entries (key, status, bytes, backbone, paradigm, created, path)")
    return ap


def _fail(message: str) -> int:
    print(f"fairsweep: error: {message}", file=sys.stderr)
    return EXIT_USAGE


@contextlib.contextmanager
def _in_file(path: str, *kinds: type[Exception]) -> Iterator[None]:
    """An error of ``kinds`` (a field of the sweep file, its study database) names the file first."""
    try:
        yield
    except kinds as exc:
        raise UserError(f"{path}: {exc}") from None


def _spec(path: str):
    """The spec file, its experiment defaulting to $MLFLOW_EXPERIMENT_NAME (spec > environment > name)."""
    from orchestrator.query_cli import env_experiment
    from orchestrator.spec import load_spec

    return load_spec(path, default_experiment=env_experiment())


def _plan(path: str):
    from orchestrator.plan import build_plan

    return build_plan(_spec(path))


def _launch_options(args: argparse.Namespace):
    from orchestrator import api

    return api.launch_options(tracking_uri=args.tracking_uri, address=args.address, storage=args.storage,
                              cache_dir=args.cache_dir, max_concurrent=args.max_concurrent, quiet=args.quiet,
                              verbose=args.verbose, dashboard=args.dashboard)


def _cmd_launch(args: argparse.Namespace) -> int:
    from orchestrator.plan import build_plan
    from orchestrator.spec import SpecError

    with _in_file(args.spec, SpecError):
        spec = _spec(args.spec)  # a mistake in the file answers at once, before Ray and MLflow load
        if args.dry_run:
            print(build_plan(spec).summary())
            return EXIT_OK
    from orchestrator import api
    from orchestrator.launch import PlanBuilder, launch
    from orchestrator.search import StudyStorageError

    with _in_file(args.spec, SpecError, StudyStorageError):
        builder = api.checked_plan_builder(spec, args.tracking_uri)  # in seconds, before Ray starts

    def plan_naming_the_file() -> Any:  # maybe built once Ray has started (its idle workers load torch meanwhile)
        with _in_file(args.spec, SpecError, StudyStorageError):
            return builder.build()

    return _print_summary(launch(PlanBuilder(spec, plan_naming_the_file), _launch_options(args)), args)


def _cmd_resume(args: argparse.Namespace) -> int:
    from orchestrator.launch import resume

    return _print_summary(resume(args.name, _launch_options(args), retry_errored=args.retry_errored), args)


def _cmd_status(args: argparse.Namespace) -> int:
    from orchestrator.status import sweep_status

    _fail_fast_http()
    status = sweep_status(args.name, args.storage, args.tracking_uri)
    print(_json(status.to_dict()) if args.format == "json" else status.render())
    return EXIT_OK


def _json(value) -> str:
    import json

    return json.dumps(value, indent=1, default=str)


def _fail_fast_http() -> None:
    """Read-only commands answer in seconds: MLflow's default retries an unreachable server for minutes
    (the probe catches a server that is down; these bound one that stops answering)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def _print_summary(result, args: argparse.Namespace) -> int:
    """Print the front and what to do next; returns the exit code."""
    from orchestrator.mlflow_runs import TAGS
    from orchestrator.query import abs_columns

    plan = result.plan
    perf, fair = plan.spec.objectives.performance, plan.spec.objectives.fairness
    front = result.front[result.front["on_front"]] if not result.front.empty else result.front
    # a signed fairness metric: the front compares the mean over seeds of |value| (its _abs columns), shown too
    distance = abs_columns(fair)
    cols = ["backbone", "paradigm", "intervention.kind", "intervention.magnitude", "freeze_depth", "finetune.size",
            "n_seeds", *(f"{m}{x}" for m in (perf, fair) for x in ("", "_std", "_ci_low", "_ci_high")), *distance]
    compared = f"|{fair}|, the mean over seeds of each trial's distance from parity," if distance else fair
    print(f"\nsweep {plan.spec.name!r}: {result.finished} trials finished, {len(result.failed)} failed; "
          f"{len(front)} configurations on the Pareto front ({perf} max, {compared} min; test split, means over "
          f"seeds with their sd and 95 % t-interval):")
    if not front.empty:
        print(front[[c for c in cols if c in front]].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        story = _front_story(result, perf, fair)
        if story:
            print(f"\nwhat it shows: {story}")
    where = f" --storage {args.storage}" if args.storage else ""
    if plan.spec.search.type == "optuna" and result.search_ended and result.finished < plan.spec.search.budget:
        print(f"the search ended before its budget of {plan.spec.search.budget}: {result.search_ended}")
    if result.failed:
        print(f"failed trial runs: {', '.join(result.failed)} (see the {TAGS.ERROR} tag of each)")
        print(f"retry them with: fairsweep resume {plan.spec.name}{where} --retry-errored")
    print(f"\nTune results (checkpoints, experiment state): {result.experiment_path}")
    print(f"MLflow: parent run {result.parent_run_id} in experiment {plan.spec.experiment!r}")
    print(f"open it with: mlflow ui --backend-store-uri {result.tracking_uri}")
    if result.interrupted:
        print(f"\ninterrupted before every trial ended; continue with: fairsweep resume {plan.spec.name}{where}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_TRIALS_FAILED if result.failed else EXIT_OK


def _front_story(result, perf: str, fair: str) -> str:
    """The one-line reading of the finished sweep (orchestrator.report.front_story), from MLflow."""
    from orchestrator.query import sweep_trials
    from orchestrator.report import front_story
    from orchestrator.store import open_client

    spec = result.plan.spec
    return front_story(sweep_trials(open_client(result.tracking_uri), spec.name, spec.experiment), perf, fair)


def _cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from orchestrator.query_cli import env_experiment
    from orchestrator.report import write_report
    from orchestrator.storage import resolve_tracking_uri
    from orchestrator.store import open_client

    _fail_fast_http()
    client = open_client(resolve_tracking_uri(args.tracking_uri))
    report = write_report(client, args.sweep, Path(args.out), experiment=args.experiment or env_experiment(),
                          performance=args.perf, fairness=args.fairness, max_drop=args.max_drop,
                          select_on=args.select_on)
    print(f"sweep {args.sweep!r}: {report.n_trials} trials, {report.front_size} configurations on the front")
    for f in report.files:
        print(f"  {f}")
    print(f"logged under report/ of parent run {report.parent_run_id}")
    return EXIT_OK


def _cmd_cka(args: argparse.Namespace) -> int:
    from pathlib import Path

    from orchestrator.query_cli import env_experiment
    from orchestrator.similarity import compare_representations, parse_selector
    from orchestrator.storage import resolve_tracking_uri
    from orchestrator.store import open_client

    _fail_fast_http()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per model would bury the summary
    a, b = parse_selector(args.a, "--a"), parse_selector(args.b, "--b")
    client = open_client(resolve_tracking_uri(args.tracking_uri))
    cka = compare_representations(client, args.sweep, a, b, Path(args.out), attribute=args.by,
                                  experiment=args.experiment or env_experiment(), max_examples=args.max_examples,
                                  debiased=args.estimator == "debiased")
    attr = cka.table["attribute"].iat[0]
    print(f"sweep {args.sweep!r}: {cka.n_pairs} pairs of trials ({' '.join(args.a)} vs {' '.join(args.b)})"
          + (f"; {cka.unmatched} without a partner" if cka.unmatched else ""))
    same = cka.table[cka.table["layer_a"] == cka.table["layer_b"]]
    for rank, group in (("best", cka.best_group), ("worst", cka.worst_group)):
        means = same[same["group"] == group].groupby("layer_a", sort=False)["cka"].mean()
        print(f"  {rank} group {attr}={group}: CKA of each layer group with itself, mean over pairs: "
              + ", ".join(f"{layer} {value:.3f}" for layer, value in means.items()))
    for f in cka.files:
        print(f"  {f}")
    print(f"logged under cka/ of parent run {cka.parent_run_id}")
    return EXIT_OK


def _print_paradigms(args: argparse.Namespace) -> int:
    from trainables.paradigms import PARADIGMS, describe_paradigms

    if args.format == "table":
        print(describe_paradigms())
        return EXIT_OK
    records = []
    for name in PARADIGMS.names():
        p = PARADIGMS.get(name)
        records.append({"name": name, "doc": p.doc, "pretrains": p.pretrains, "modalities": list(p.modalities),
                        "options": [{"name": k, "default": o.default, "type": type(o.default).__name__, "doc": o.doc,
                                     "low": o.low, "high": o.high, "low_open": o.low_open} for k, o in p.options.items()]})
    records.append({"name": "file:PATH", "doc": "weights-only load of a local .safetensors/.pt/.pth/.bin/.ckpt state "
                    "dict", "pretrains": False, "modalities": [], "options": []})
    print(_json(records))
    return EXIT_OK


def _cmd_validate(args: argparse.Namespace) -> int:
    from orchestrator.spec import SpecError

    with _in_file(args.spec, SpecError):
        plan = _plan(args.spec)
    print(_json(_plan_record(plan)) if args.format == "json" else plan.summary())
    return EXIT_OK


def _cmd_schema(args: argparse.Namespace) -> int:
    from orchestrator.spec import json_schema

    print(_json(json_schema()))
    return EXIT_OK


def _plan_record(plan) -> dict:
    """``validate --format json``: what ``Plan.summary`` shows, complete (every grid trial; none under the
    optuna search, whose sampler proposes them while it runs)."""
    from dataclasses import asdict

    s = plan.spec
    return {"name": s.name, "experiment": s.experiment,
            "dataset": {"name": s.dataset.name, "options": dict(s.dataset.options)},
            "search": asdict(s.search) if s.search.type == "optuna" else {"type": s.search.type},
            "objectives": asdict(s.objectives),
            "n_trials": s.n_trials, "grid_size": s.grid_size, "layer_groups": dict(plan.layer_groups),
            "pretrain_jobs": [{"key": j.key, "backbone": j.backbone, "paradigm": j.paradigm,
                               "hparams": j.hparams.to_dict()} for j in plan.pretrain_jobs],
            "trials": [{"key": t.key, "config_key": t.config_key, "pretrain_key": t.config.weights.key,
                        "config": t.point.to_dict(), "frozen_groups": list(t.frozen_groups), "n_groups": t.n_groups}
                       for t in plan.trials]}


def _cmd_cache(args: argparse.Namespace) -> int:
    from orchestrator.storage import CACHE_DIRNAME, resolve_storage
    from trainables.pretrain_cache import PretrainCache

    root = args.cache_dir or os.path.join(resolve_storage(args.storage), CACHE_DIRNAME)
    cache = PretrainCache(root)
    if args.action == "list":
        entries = cache.entries()
        if args.format == "json":
            print(_json([{**e, "path": os.path.join(root, e["key"])} for e in entries]))
            return EXIT_OK
        print(f"{len(entries)} entries in {root}")
        for e in entries:
            print(f"  {e['key']}  {e['status']:<8} {e.get('backbone') or '?':<24} {e.get('paradigm') or '?':<12} "
                  f"{e['bytes'] / 1e6:.1f} MB  {e.get('created') or ''}")
        return EXIT_OK
    if args.format != "table":
        raise UserError("cache clear --format: only `cache list` has a json form; drop --format")
    if not args.key and not args.yes:
        _confirm_clear_all(cache, root)
    removed = cache.clear(args.key)
    print(f"removed {len(removed)} entries from {root}")
    return EXIT_OK


def _confirm_clear_all(cache, root: str) -> None:
    """``cache clear`` without --key deletes every pretrained model, hours of work: ask on a terminal;
    elsewhere (CI, a pipe) no one can answer, so refuse unless --yes. Returns: go ahead."""
    n = len(cache.entries())
    if not sys.stdin.isatty():
        raise UserError(f"cache clear without --key deletes every entry in {root} ({n} now); stdin is not a terminal, "
                        f"so nothing was asked and nothing removed: pass --yes to clear them all, or --key KEY for one")
    if n == 0:
        return
    print(f"delete all {n} entries in {root}? [y/N] ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline().strip().lower()
    if answer not in ("y", "yes"):
        raise UserError("nothing removed (not confirmed); pass --yes to clear without asking, or --key KEY for one "
                        "entry")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    if "_ARGCOMPLETE" in os.environ:  # a shell asking for completions (argcomplete, the [completion] extra)
        try:
            import argcomplete
        except ImportError:
            pass
        else:
            argcomplete.autocomplete(parser)  # prints the candidates and exits
    args = parser.parse_args(argv)
    from orchestrator import raylocal  # before any command imports ray: a local Ray listens on 127.0.0.1 only

    raylocal.loopback_default(getattr(args, "address", None))
    try:
        return args.handler(args)
    except UserError as exc:  # the one place an error becomes an exit code; any other exception is a bug: exit 1
        return _fail(str(exc))
    except KeyboardInterrupt:
        print("fairsweep: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def run() -> NoReturn:
    """The console script (and ``python -m orchestrator.cli``): ``main``, its exit handlers, then the process
    ends at once. Tearing down the modules of torch, Ray and MLflow afterwards did nothing a user needs and took
    0.7 s after a query and 2.3 s after a launch (measured from the last exit handler to the process's end)."""
    code = main()
    threading._shutdown()  # what a normal exit does first: idle thread pools stop, other threads are joined
    atexit._run_exitfuncs()  # Ray's, logging's and MLflow's exit handlers: the run's files are complete
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
