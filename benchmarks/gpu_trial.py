"""Images per second and GPU busy fraction when several trials share one GPU, against one process at full speed.

Trials of a sweep on a GPU node are Ray actors holding a fraction of a GPU (``resources.gpus_per_trial``):
1, 0.5, 0.25 or 0.125 put 1, 2, 4 or 8 trials on one GPU. Each trial here is what a finetuning trial runs
per epoch: the project's own training step (``trainables.loop.train_epoch``: bf16 autocast on CUDA, weights
and batches in channels_last via ``loop.to_device``/``loop.on_device``) on inputs already on the device (data
loading is measured by benchmarks/data_loading.py; folder images come from the decoded-image cache). The
reference is the same loop in this one process with the device to itself. For each packing it prints the
summed images per second of all trials, the GPU's busy fraction and the ratio to the single-process peak.

Busy fraction: NVML's utilization.gpu sampled during the measurement (pynvml if installed, else nvidia-smi)
where available; otherwise an estimate, the share of wall time in which some trial had a training epoch in
flight (an upper bound: it counts the host's gaps between kernels as busy). The output names which.

    .venv/bin/python benchmarks/gpu_trial.py [--backbone resnet50] [--image-size 224] [--batch-size 128]
    .venv/bin/python benchmarks/gpu_trial.py --device cpu --tiny     # the same code paths on CPU, in seconds
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PACKINGS = (1, 2, 4, 8)
TARGET = 0.7  # of the single-process peak, at the best packing (issue 16)


@dataclass(frozen=True)
class Setup:
    """What every trial of a measurement trains: a backbone on random images of one size, on one device."""

    device: str
    backbone: str
    image_size: int
    batch_size: int
    steps_per_epoch: int
    seconds: float
    threads: int  # intra-op CPU threads of the single process; packed trials split them


class Trainer:
    """One trial's training: the model, its inputs on the device, and epochs of ``loop.train_epoch``."""

    def __init__(self, setup: dict[str, Any]):
        import torch

        from trainables import backbones, loop

        self.s = Setup(**setup)
        loop.set_threads(self.s.threads)
        loop.set_precision("bf16")  # as a trial of a sweep with resources.precision: bf16 (the default)
        self.device = torch.device(self.s.device)
        torch.manual_seed(0)
        shape = (3, self.s.image_size, self.s.image_size)
        model = backbones.create_backbone(self.s.backbone, num_classes=2, input_shape=shape)
        self.model = loop.to_device(model, self.device)
        rows = self.s.batch_size * self.s.steps_per_epoch
        self.x = loop.on_device(torch.randn(rows, *shape), self.device)
        self.y = torch.randint(0, 2, (rows,), device=self.device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.gen = torch.Generator().manual_seed(0)
        self.run(0.0)  # one epoch: kernels chosen, allocator warm

    def ready(self) -> bool:
        return True

    def describe(self) -> dict[str, Any]:
        """Where and how it trains: device name, autocast dtype, the weights' and batches' memory layout."""
        import torch

        from trainables import loop

        with loop.autocast(self.device):
            dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.float32
        conv = next(p for p in self.model.parameters() if p.dim() == 4)
        batch = loop.on_device(self.x[:2], self.device)
        return {"name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
                "dtype": str(dtype).replace("torch.", ""),
                "channels_last": conv.is_contiguous(memory_format=torch.channels_last)
                and batch.is_contiguous(memory_format=torch.channels_last)}

    def run(self, seconds: float) -> dict[str, Any]:
        """Epochs until ``seconds`` have passed (at least one): images trained and each epoch's wall span."""
        import torch

        from trainables import loop

        images, spans = 0, []
        start = time.time()
        while not spans or time.time() - start < seconds:
            began = time.time()
            loop.train_epoch(self.model, self.x, self.y, self.opt, batch_size=self.s.batch_size, generator=self.gen,
                             device=self.device)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            spans.append((began, time.time()))
            images += len(self.x)
        return {"images": images, "start": start, "end": time.time(), "spans": spans}


class BusySampler:
    """NVML's utilization.gpu of one GPU, sampled in the background (pynvml, else nvidia-smi); None without."""

    def __init__(self, device: str, interval_s: float = 0.1):
        self.samples: list[float] = []
        self.interval_s = interval_s
        self.source: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._index = int((os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0] or 0)
        if device != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self._index)
            self._read = lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            self.source = "pynvml"
        except Exception:  # not installed, or no NVML library
            if shutil.which("nvidia-smi"):
                self._read = self._nvidia_smi
                self.source = "nvidia-smi"

    def _nvidia_smi(self) -> float:
        out = subprocess.run(["nvidia-smi", f"--id={self._index}", "--query-gpu=utilization.gpu",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, check=True)
        return float(out.stdout.strip().splitlines()[0])

    def __enter__(self) -> BusySampler:
        if self.source:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.samples.append(self._read() / 100.0)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def busy(self, runs: list[dict[str, Any]]) -> float:
        """The mean sampled utilisation, or the estimate from the trials' epoch spans."""
        if self.source and self.samples:
            return sum(self.samples) / len(self.samples)
        return _in_flight(runs)


def _in_flight(runs: list[dict[str, Any]]) -> float:
    """Share of the measurement's wall time covered by some trial's epoch span (the union of the spans)."""
    start, end = min(r["start"] for r in runs), max(r["end"] for r in runs)
    covered, reach = 0.0, start
    for a, b in sorted(s for r in runs for s in r["spans"]):
        if b > reach:
            covered += b - max(a, reach)
            reach = b
    return covered / (end - start) if end > start else 0.0


def _rate(runs: list[dict[str, Any]]) -> float:
    """Images per second of all trials together, over the window from the first start to the last end."""
    return sum(r["images"] for r in runs) / (max(r["end"] for r in runs) - min(r["start"] for r in runs))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--tiny", action="store_true", help="test_resnet at 32 px, one thread, a second per measurement "
                                                        "(a check of the code paths, not a measurement)")
    ap.add_argument("--backbone", default=None, help="any timm model (default resnet50; test_resnet with --tiny)")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=None, help="measured time per packing (after a warm-up epoch)")
    ap.add_argument("--packings", type=int, nargs="+", default=list(PACKINGS), help="trials per GPU to measure")
    args = ap.parse_args()

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device is visible; run with --device cpu (add --tiny for a quick check)", file=sys.stderr)
        return 2
    cpus = os.cpu_count() or 1
    setup = Setup(device=args.device, backbone=args.backbone or ("test_resnet" if args.tiny else "resnet50"),
                  image_size=args.image_size or (32 if args.tiny else 224),
                  batch_size=args.batch_size or (16 if args.tiny else 128), steps_per_epoch=2 if args.tiny else 8,
                  seconds=args.seconds or (1.0 if args.tiny else 20.0), threads=1 if args.tiny else cpus)

    single = Trainer(asdict(setup))
    info = single.describe()
    with BusySampler(setup.device) as sampler:
        runs = [single.run(setup.seconds)]
    peak, peak_busy = _rate(runs), sampler.busy(runs)
    how = (f"NVML utilization.gpu via {sampler.source}, sampled every {sampler.interval_s:g} s" if sampler.source else
           "estimate: share of wall time with a training epoch in flight (no NVML; an upper bound)")
    print(f"device: {setup.device} ({info['name']}); autocast dtype: {info['dtype']}; channels_last: "
          f"{'yes' if info['channels_last'] else 'no'}; busy fraction: {how}")
    print(f"backbone {setup.backbone}, {setup.image_size} px, batch {setup.batch_size}, {setup.seconds:g} s per "
          f"measurement, {cpus} CPUs")
    print(f"{'single process':<40} {peak:10.1f} images/s  busy {peak_busy:.2f}  ratio 1.00", flush=True)
    del single
    if setup.device == "cuda":
        torch.cuda.empty_cache()

    from orchestrator import raylocal  # noqa: F401 - before ray: a local Ray listens on 127.0.0.1

    import ray

    # a private local Ray; on CPU with one logical GPU, so the packings schedule exactly as on a GPU node
    ray.init(address="local", num_cpus=cpus, num_gpus=None if setup.device == "cuda" else 1, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    remote = ray.remote(Trainer)
    ratios = {}
    try:
        for k in args.packings:
            per_trial = replace(setup, threads=max(1, setup.threads // k))  # on CPU the cores are split
            actors = [remote.options(num_gpus=1 / k, num_cpus=0).remote(asdict(per_trial)) for _ in range(k)]
            ray.get([a.ready.remote() for a in actors])
            with BusySampler(setup.device) as sampler:
                runs = ray.get([a.run.remote(setup.seconds) for a in actors])
            rate = _rate(runs)
            ratios[k] = rate / peak
            label = f"{k} trial{'s' if k > 1 else ''} per GPU (gpus_per_trial {1 / k:g})"
            print(f"{label:<40} {rate:10.1f} images/s  busy {sampler.busy(runs):.2f}  ratio {ratios[k]:.2f}",
                  flush=True)
            for a in actors:
                ray.kill(a)
    finally:
        ray.shutdown()
    best = max(ratios, key=ratios.get)
    print(f"best packing: {best} trial{'s' if best > 1 else ''} per GPU, {ratios[best]:.2f} of the single-process peak "
          f"(target >= {TARGET})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
