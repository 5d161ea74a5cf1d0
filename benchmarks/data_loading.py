"""Samples per second each dataset adapter delivers, measured once on small generated fixtures.

In-memory adapters (synthetic_*, timeseries_arrays) are timed from construction through one pass of
``loader`` batches; folder adapters (celeba, waterbirds, image_csv) stream JPEG/PNG files decoded by
DataLoader workers, timed for each worker count. Fixture images are small (24x20), so the numbers are
an upper bound on decoding throughput for real photos; what they compare is the adapters' overhead.
Usage:
    .venv/bin/python benchmarks/data_loading.py [--images 2000] [--workers 0 2] [--image-size 64]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _rate(dataset, split: str, batch_size: int, workers: int | None) -> tuple[int, float]:
    n = len(dataset.meta(split))
    started = time.perf_counter()
    seen = sum(len(pos) for _, pos in dataset.loader(split, batch_size=batch_size, shuffle=True, num_workers=workers))
    elapsed = time.perf_counter() - started
    assert seen == n  # every row arrives once
    return n, n / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="images per folder fixture")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts to time")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    from trainables.data import build_dataset
    from trainables.data import fixtures as F

    print(f"cpus: {os.cpu_count()}  images per fixture: {args.images}  image_size: {args.image_size}  "
          f"batch: {args.batch_size}")
    print(f"{'adapter':<22}{'split':<10}{'workers':>8}{'samples':>9}{'samples/s':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        n = args.images - args.images % 24  # fixtures cycle through 16 or 24 combinations per block
        folders = {"celeba": F.write_celeba(root / "celeba", n=n - n % 80),
                   "waterbirds": F.write_waterbirds(root / "waterbirds", n=n - n % 20),
                   "image_csv": F.write_image_csv(root / "image_csv", n=n - n % 60)}
        for name, opts in folders.items():
            ds = build_dataset(name, {**opts, "image_size": args.image_size})
            for workers in args.workers:
                count, rate = _rate(ds, "finetune", args.batch_size, workers)
                print(f"{name:<22}{'finetune':<10}{workers:>8}{count:>9}{rate:>12.0f}")
        memory = {
            "synthetic_images": {"n_finetune": n, "image_size": args.image_size},
            "synthetic_timeseries": {"n_finetune": 10 * n, "length": 128},
            "timeseries_arrays": F.write_timeseries_arrays(root / "arrays", n=10 * n, length=128),
        }
        for name, opts in memory.items():
            started = time.perf_counter()
            ds = build_dataset(name, opts)
            count, rate = _rate(ds, "finetune", args.batch_size, None)
            total = time.perf_counter() - started
            print(f"{name:<22}{'finetune':<10}{'-':>8}{count:>9}{rate:>12.0f}   (with construction: "
                  f"{count / total:.0f}/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
