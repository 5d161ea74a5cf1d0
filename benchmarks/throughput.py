"""What a sweep costs beyond its training: fairsweep against the floor and against the naive script.

Three ways to run the same spec, interleaved and repeated in one invocation (A B C A B C ..., medians):

  floor      the same trials through ``train_and_evaluate`` (pretraining jobs first, then the trials) in a
             pool of plain worker processes, one per trial slot: no Ray, no MLflow, no checkpoints; timed
             as a fresh ``python`` process, like the launch (interpreter start and imports included);
  fairsweep  ``fairsweep launch SPEC`` (Ray, MLflow, checkpoints, the shared stages);
  naive      ``benchmarks/naive_tune.py``: a plain Tune grid with MLflowLoggerCallback and the pretraining
             inside every trial (what a user writes instead);
  tune       (with ``--bare-tune``) ``benchmarks/bare_tune.py``: Ray Tune alone on the same trials, each base
             built once inside the trials as fairsweep does, no MLflow, no checkpoints: what Ray and Tune
             cost before fairsweep adds anything.

Prints every wall time, the medians, the ratios fairsweep/floor and naive/fairsweep (and tune/floor,
fairsweep/tune), the seconds fairsweep adds to the floor (median over the interleaved pairs), and the largest
metric difference between floor and fairsweep trials of the same key (the orchestration must not change
results). Each run's CPU time is counted too: every process it started, Ray's workers included (polled, since the
kernel's count misses the children of a parent that ignores SIGCHLD, as Ray's raylet does). From it, the least
wall time fairsweep's work can take on this machine's cores, against 1.3 times the floor: whether scheduling
could still meet the target, or only less work. Usage:

    .venv/bin/python benchmarks/throughput.py [SPEC] [--repeats 2] [--skip-naive] [--bare-tune]

SPEC defaults to sweeps/quickstart.yaml; benchmarks/throughput_long.yaml is the same grid with training that
takes minutes, where the ratio shows what orchestration adds beyond its fixed start-up cost.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

COMPARED = ("accuracy", "equalized_odds_difference", "val_accuracy", "auroc")


def _env() -> dict[str, str]:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    return env


def _pretrain(job: dict, cache: str, cpus: float, input_cache: str | None, input_cache_bytes: int | None) -> None:
    from trainables.pretrain import run_pretrain_job

    run_pretrain_job(job, cache, cpus, input_cache, input_cache_bytes)


def _trial(trial: dict, context: Any) -> dict:
    from trainables.finetune import train_and_evaluate
    from trainables.trial import TrialConfig

    return train_and_evaluate(TrialConfig.from_dict(trial), context)


def run_floor(spec: Path, workdir: Path) -> tuple[float, dict[str, dict]]:
    from orchestrator.launch import _trial_context
    from orchestrator.plan import build_plan
    from orchestrator.spec import load_spec
    from trainables.data.images import DECODED_CACHE_DIRNAME
    from trainables.feature_cache import FEATURE_CACHE_DIRNAME

    started = time.perf_counter()
    plan = build_plan(load_spec(spec))
    res = plan.spec.resources
    slots = max(1, int((os.cpu_count() or 1) // max(res.cpus_per_trial, 1e-9)))
    cache = str(workdir / "pretrain_cache")
    # the same trials: with the feature and decoded-image caches where the spec gives fairsweep them
    context = _trial_context(plan, cache, feature_cache=str(workdir / FEATURE_CACHE_DIRNAME),
                             input_cache=str(workdir / DECODED_CACHE_DIRNAME))
    with ProcessPoolExecutor(max_workers=slots) as pool:
        for f in [pool.submit(_pretrain, j.to_dict(), cache, res.cpus_per_trial, context.input_cache,
                              context.input_cache_bytes)
                  for j in plan.pretrain_jobs]:
            f.result()
        futures = {t.key: pool.submit(_trial, t.config.to_dict(), context) for t in plan.trials}
        results = {key: f.result() for key, f in futures.items()}
    return time.perf_counter() - started, results


class Timing(NamedTuple):
    wall: float  # seconds from the command's start to its exit
    cpu: float  # CPU seconds (user + system) of the command and of every process it started, Ray's included


def become_subreaper() -> bool:
    """Make this process the reaper of its descendants' orphans (Linux ``PR_SET_CHILD_SUBREAPER``): a process whose
    parent exited first stays a descendant here, so ``CpuMeter`` still sees it and ``_timed`` waits for it; False
    where the platform has no such setting."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(36, 1, 0, 0, 0) == 0  # 36: PR_SET_CHILD_SUBREAPER


class CpuMeter:
    """The CPU time of this process's descendants, polled every ``interval_s``: the kernel's own count
    (``RUSAGE_CHILDREN``) misses the children of a parent that ignores SIGCHLD, as Ray's raylet does with its
    workers, where the trials run. Each process's last ``interval_s`` before it ends is not seen."""

    def __init__(self, interval_s: float = 0.25):
        import psutil

        self._me = psutil.Process()
        self._interval_s = interval_s
        self._seen: dict[tuple[int, float], float] = {}  # (pid, start time): its own user + system seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll_until_stopped, name="cpu-meter", daemon=True)

    def poll(self) -> None:
        import psutil

        for proc in self._me.children(recursive=True):
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    self._seen[(proc.pid, proc.create_time())] = times.user + times.system
            except psutil.Error:
                pass  # ended meanwhile: its last poll stands

    def _poll_until_stopped(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.poll()

    def __enter__(self) -> "CpuMeter":
        self.poll()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def cpu(self) -> float:
        return sum(self._seen.values())


def _reap_descendants(timeout_s: float) -> list[int]:
    """Wait for the processes a finished command left behind (reparented here by ``become_subreaper``); returns the
    pids still running after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return []  # no child left
        if pid:
            continue
        if time.monotonic() >= deadline:
            import psutil

            return [c.pid for c in psutil.Process().children()]
        time.sleep(0.05)


def _timed(what: str, cmd: list[str], workdir: Path) -> Timing:
    """Wall and CPU time of ``cmd`` as a fresh process in ``workdir``; raises with its output if it fails. The
    wall time ends when the command exits; the CPU time also counts what its processes did until they ended."""
    with CpuMeter() as meter:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=workdir, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        meter.poll()  # the command's own process, even if it ends before the first interval
        stdout, stderr = proc.communicate()
        wall = time.perf_counter() - started
        left = _reap_descendants(timeout_s=30.0)
    if left:
        print(f"warning: {what} left {len(left)} process(es) running 30 s after it exited (pids {left}); their CPU "
              f"time after that is not counted", file=sys.stderr, flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}): {stdout[-1500:]}{stderr[-1500:]}")
    return Timing(wall, meter.cpu)


def run_floor_cold(spec: Path, workdir: Path) -> tuple[Timing, dict[str, dict]]:
    """``run_floor`` in a fresh Python process, timed from outside like ``fairsweep launch``: a warm benchmark
    process (torch already imported, forked into the pool) would leave the floor's start-up uncounted."""
    out_file = workdir / "floor.json"
    timing = _timed("floor", [sys.executable, __file__, str(spec), "--floor-into", str(out_file)], workdir)
    return timing, json.loads(out_file.read_text())


def run_fairsweep(spec: Path, workdir: Path) -> tuple[Timing, dict[str, dict]]:
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    timing = _timed("fairsweep launch", [sys.executable, "-m", "orchestrator.cli", "launch", str(spec), "--quiet",
                                       "--tracking-uri", uri, "--storage", str(workdir / "results")], workdir)
    from mlflow.tracking import MlflowClient

    from orchestrator.plan import build_plan
    from orchestrator.query import load_trials
    from orchestrator.spec import load_spec

    name = build_plan(load_spec(spec)).spec
    trials = load_trials(MlflowClient(uri), name.experiment, name.name)
    return timing, {row["trial_key"]: row.to_dict() for _, row in trials.iterrows()}


def run_naive(spec: Path, workdir: Path) -> tuple[Timing, dict]:
    return _timed("naive script", [sys.executable, str(REPO / "benchmarks" / "naive_tune.py"), str(spec),
                                    str(workdir / "naive"), f"sqlite:///{workdir / 'naive.db'}"], workdir), {}


def run_bare_tune(spec: Path, workdir: Path) -> tuple[Timing, dict]:
    return _timed("bare Tune", [sys.executable, str(REPO / "benchmarks" / "bare_tune.py"), str(spec),
                                str(workdir / "bare")], workdir), {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", nargs="?", default=str(REPO / "sweeps" / "quickstart.yaml"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-naive", action="store_true", help="floor and fairsweep only (the naive script is slow)")
    ap.add_argument("--bare-tune", action="store_true", help="also Ray Tune alone on the same trials (bare_tune.py)")
    ap.add_argument("--floor-into", help=argparse.SUPPRESS)  # internal: run the floor here, write its results there
    args = ap.parse_args()
    spec = Path(args.spec).resolve()
    if args.floor_into:
        _, results = run_floor(spec, Path(args.floor_into).parent)
        Path(args.floor_into).write_text(json.dumps(results, default=str))
        return 0
    modes = {"floor": run_floor_cold, "fairsweep": run_fairsweep, **({"tune": run_bare_tune} if args.bare_tune else {}),
             **({} if args.skip_naive else {"naive": run_naive})}
    counts_orphans = become_subreaper()
    times: dict[str, list[float]] = {m: [] for m in modes}
    cpus: dict[str, list[float]] = {m: [] for m in modes}
    worst = 0.0
    for rep in range(args.repeats):
        outcomes = {}
        for mode, run in modes.items():  # interleaved: A B C, A B C, ...
            with tempfile.TemporaryDirectory() as tmp:
                timing, outcomes[mode] = run(spec, Path(tmp))
            times[mode].append(timing.wall)
            cpus[mode].append(timing.cpu)
            print(f"repeat {rep + 1} {mode:<9} {timing.wall:7.1f} s  ({timing.cpu:6.1f} CPU-s)", flush=True)
        for key, want in outcomes["floor"].items():
            got = outcomes["fairsweep"].get(key)
            if got is None:
                raise RuntimeError(f"trial {key} ran in the floor but has no finished fairsweep run")
            worst = max(worst, *(abs(float(got[m]) - float(want[m])) for m in COMPARED))
    med = {m: statistics.median(v) for m, v in times.items()}
    med_cpu = {m: statistics.median(v) for m, v in cpus.items()}
    cores = os.cpu_count() or 1
    print(f"\nspec: {spec.name}  cpus: {cores}  repeats: {args.repeats}")
    for m, v in med.items():
        print(f"median {m:<9} {v:7.1f} s  ({med_cpu[m]:6.1f} CPU-s)")
    print(f"fairsweep / floor   = {med['fairsweep'] / med['floor']:.2f}  (target <= 1.3)")
    # no schedule runs a command in less wall time than its CPU work over the machine's cores
    bound = med_cpu["fairsweep"] / cores
    print(f"CPU work: fairsweep {med_cpu['fairsweep']:.1f} CPU-s against the floor's {med_cpu['floor']:.1f} "
          f"({med_cpu['fairsweep'] / med_cpu['floor']:.2f}x); on {cores} cores fairsweep needs at least {bound:.1f} s, "
          f"1.3 x floor is {1.3 * med['floor']:.1f} s: "
          + ("only less work can meet the target" if bound > 1.3 * med["floor"] else "within reach of scheduling")
          + ("" if counts_orphans else " (without a reaper setting here, processes orphaned before they ended are not "
                    "counted: a lower bound)"))
    # each repeat's pair ran back to back, so its difference shrugs off the machine's drift between minutes
    added = statistics.median(f - b for f, b in zip(times["fairsweep"], times["floor"]))
    print(f"fairsweep - floor   = {added:.1f} s  (median over the repeats' pairs: what a launch adds to the same "
          f"training, about fixed whatever the sweep's length)")
    if "naive" in med:
        print(f"naive / fairsweep   = {med['naive'] / med['fairsweep']:.2f}  (target >= 3)")
    if "tune" in med:
        print(f"tune / floor        = {med['tune'] / med['floor']:.2f}  (what Ray and Tune alone cost)")
        print(f"fairsweep / tune    = {med['fairsweep'] / med['tune']:.2f}  (what fairsweep adds to them)")
    print(f"largest metric difference floor vs fairsweep over {', '.join(COMPARED)}: {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
