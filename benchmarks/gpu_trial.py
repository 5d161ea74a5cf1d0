"""One pretraining job and one finetuning trial on the device this machine offers (CUDA if any).

Shows where training runs (model, data, autocast dtype) and how long each stage takes, measured in
this one run; no Ray or MLflow needed, so it runs on a bare GPU box. Usage:
    python benchmarks/gpu_trial.py [--backbone test_resnet] [--image-size 64]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    import torch

    from trainables import loop
    from trainables.finetune import TrialContext, train_and_evaluate
    from trainables.pretrain import run_pretrain_job

    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="test_resnet")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--paradigm", default="supervised")
    args = ap.parse_args()
    device = loop.select_device()
    with loop.autocast(device):
        dtype = torch.get_autocast_dtype("cuda") if device.type == "cuda" and torch.is_autocast_enabled("cuda") else torch.float32
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(f"device: {device} ({name}); autocast dtype: {dtype}")
    opts = {"n_source": 4000, "n_finetune": 6000, "n_val": 500, "n_test": 2000, "image_size": args.image_size, "seed": 0}
    hp = {"epochs": 3, "batch_size": 128, "lr": 0.05, "weight_decay": 5e-4, "momentum": 0.9, "seed": 0, "options": {}}
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        job = {"key": "gpu-check", "backbone": args.backbone, "paradigm": args.paradigm, "dataset": "synthetic_images",
               "dataset_options": opts, "hparams": hp}
        outcome = run_pretrain_job(job, cache, cpus=4)
        t1 = time.perf_counter()
        print(f"pretraining ({args.paradigm}, 3 epochs x 4000 images): {t1 - t0:.1f} s on {outcome.device}; "
              f"losses {[round(x, 3) for x in outcome.losses]}")
        ctx = TrialContext(dataset="synthetic_images", dataset_options=opts,
                           finetune={"size": 2000, "epochs": 3, "batch_size": 64, "lr": 0.01, "weight_decay": 0.0,
                                     "momentum": 0.9, "threshold": 0.5},
                           cache_root=cache, pretrained={f"{args.backbone}|{args.paradigm}": "gpu-check"}, cpus_per_trial=4)
        for freeze in (0, "linear"):
            t2 = time.perf_counter()
            point = {"backbone": args.backbone, "paradigm": args.paradigm, "intervention": "correlation",
                     "magnitude": 0.7, "freeze_depth": freeze, "seed": 0}
            result = train_and_evaluate(point, ctx)
            print(f"finetuning (freeze {freeze}, 3 epochs x 2000 images + 2000 test): {time.perf_counter() - t2:.1f} s on "
                  f"{result['device']}; accuracy {result['accuracy']:.3f}, equalized odds difference "
                  f"{result['equalized_odds_difference']:.3f}, frozen fraction {result['frozen_fraction']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
