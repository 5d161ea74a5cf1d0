"""benchmarks/gpu_trial.py runs its GPU code paths on CPU (``--device cpu --tiny``): the single-process reference
and each packing as Ray actors holding a fraction of a (logical) GPU, with the lines it reports."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.helpers import REPO, cli_env

ROW = re.compile(r"(single process|\d+ trials? per GPU \(gpus_per_trial [\d.]+\)) +([\d.]+) images/s  busy ([\d.]+)  "
                 r"ratio ([\d.]+)$")


@pytest.mark.slow  # it starts a local Ray for the packings' actors
def test_the_gpu_benchmark_runs_its_code_paths_on_cpu():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_trial.py"), "--device", "cpu", "--tiny",
                          "--packings", "1", "2"], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0] == ("device: cpu (cpu); autocast dtype: float32; channels_last: no; busy fraction: estimate: share "
                        "of wall time with a training epoch in flight (no NVML; an upper bound)"), lines
    assert lines[1].startswith("backbone test_resnet, 32 px, batch 16, 1 s per measurement, ")
    rows = {m[1]: (float(m[2]), float(m[3]), float(m[4])) for m in map(ROW.match, lines) if m}
    assert list(rows) == ["single process", "1 trial per GPU (gpus_per_trial 1)",
                          "2 trials per GPU (gpus_per_trial 0.5)"]
    assert all(rate > 0 and 0 < busy <= 1 and ratio > 0 for rate, busy, ratio in rows.values())
    assert rows["single process"][2] == 1.0
    best = max((1, 2), key=lambda k: rows[[*rows][k]][2])
    assert lines[-1] == (f"best packing: {best} trial{'s' if best > 1 else ''} per GPU, "
                         f"{rows[[*rows][best]][2]:.2f} of the single-process peak (target >= 0.7)")


def test_it_says_how_to_run_without_a_gpu():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_trial.py"), "--device", "cuda"], cwd=REPO,
                         env={**cli_env(), "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "run with --device cpu" in out.stderr
