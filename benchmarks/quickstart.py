"""Time the quickstart sweep end to end (Ray start-up included) in a scratch directory.

Prints trials, wall time and time per trial measured in this one run. Usage:
    .venv/bin/python benchmarks/quickstart.py [SPEC]
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    spec = Path(sys.argv[1] if len(sys.argv) > 1 else REPO / "sweeps" / "quickstart.yaml").resolve()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "launch", str(spec), "--quiet"], cwd=tmp,
                             env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if out.returncode != 0:
            print(out.stdout[-2000:], out.stderr[-2000:], sep="\n")
            return out.returncode
        line = next(l for l in out.stdout.splitlines() if "trials finished" in l)
        trials = int(line.split(":", 1)[1].split()[0])
    print(f"spec: {spec.name}  cpus: {os.cpu_count()}")
    print(f"trials: {trials}  wall: {wall:.1f} s  per trial: {wall / trials:.2f} s  (Ray start-up and pretraining included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
