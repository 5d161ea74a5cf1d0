"""The training loop: failure messages that say what to change (divergence, out of memory), and precision."""
from __future__ import annotations

import pytest
import torch

from trainables import loop


def test_a_real_failed_allocation_becomes_an_out_of_memory_error_with_advice():
    with pytest.raises(loop.TrialOutOfMemoryError) as err:
        with loop.memory_hint(torch.device("cpu"), 4096):
            torch.empty(2 ** 62, dtype=torch.uint8)  # the host allocator refuses this for real
    text = str(err.value)
    assert "out of host memory on cpu with batch_size 4096" in text and "lower finetune.batch_size" in text
    assert isinstance(err.value.__cause__, RuntimeError)


def test_other_errors_pass_through_unchanged():
    with pytest.raises(ValueError, match="not memory"):
        with loop.memory_hint(torch.device("cpu"), 8):
            raise ValueError("not memory")


def test_divergence_names_the_learning_rate():
    model = torch.nn.Linear(4, 2)
    x = torch.full((8, 4), float("nan"))
    y = torch.zeros(8, dtype=torch.long)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(loop.NonFiniteLossError, match="lower the learning rate"):
        loop.train_epoch(model, x, y, opt, batch_size=4, generator=torch.Generator().manual_seed(0),
                         device=torch.device("cpu"))


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_precision_decides_autocast_and_tf32(monkeypatch, tf32_restored):
    """bf16 autocasts only on a CUDA device with bf16 support; fp32 never does and turns TF32 off."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert isinstance(loop.autocast(cuda, "bf16"), torch.autocast) and loop.effective_precision(cuda, "bf16") == "bf16"
    assert not isinstance(loop.autocast(cuda, "fp32"), torch.autocast)
    assert loop.effective_precision(cuda, "fp32") == "fp32"
    assert not isinstance(loop.autocast(cpu, "bf16"), torch.autocast)
    assert loop.effective_precision(cpu, "bf16") == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # an older GPU: fp32 whatever asked
    assert not isinstance(loop.autocast(cuda, "bf16"), torch.autocast)
    assert loop.effective_precision(cuda, "bf16") == "fp32"
    with pytest.raises(ValueError, match="'fp16' is not one of bf16, fp32"):
        loop.autocast(cpu, "fp16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    loop.set_precision("fp32")
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
    # a function not told the precision (a plugin's trainer) follows the process's, as the sweep set it
    assert loop.process_precision() == "fp32" and not isinstance(loop.autocast(cuda), torch.autocast)
    loop.set_precision("bf16")  # torch's defaults
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, True)
    assert loop.process_precision() == "bf16" and isinstance(loop.autocast(cuda), torch.autocast)
    with pytest.raises(ValueError, match="'fp16' is not one of"):
        loop.set_precision("fp16")


@pytest.fixture
def tf32_restored():
    """The process-wide flags ``set_precision`` sets go back to what they were when the test ends."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_a_sweeps_fp32_reaches_every_autocast_of_its_jobs_and_trials(tmp_path, monkeypatch, tf32_restored):
    """resources.precision: fp32 on a GPU sweep: every autocast of pretraining (supervised and SSL) and of the
    trials (whole model and cached prefix) is asked for fp32, so none would run in bf16 on the GPU."""
    from dataclasses import replace

    from orchestrator.launch import _trial_context
    from orchestrator.plan import build_plan
    from orchestrator.spec import parse_spec
    from tests.helpers import tiny_spec
    from trainables.finetune import train_and_evaluate
    from trainables.pretrain import run_pretrain_job

    asked = []
    real = loop.autocast
    monkeypatch.setattr(loop, "autocast", lambda device, precision="bf16": asked.append(precision) or real(device,
                                                                                                            precision))
    spec = tiny_spec(**{"axes.paradigm": ["supervised", "simclr"], "axes.intervention.magnitudes": [0.5],
                        "resources.gpus_per_trial": 0.5, "resources.precision": "fp32"})
    plan = build_plan(parse_spec(spec))
    for job in plan.pretrain_jobs:
        run_pretrain_job(job.to_dict(), str(tmp_path / "cache"))
    assert len(asked) > 10 and set(asked) == {"fp32"}
    asked.clear()
    context = replace(_trial_context(plan, str(tmp_path / "cache"), feature_cache=str(tmp_path / "features")),
                      bootstrap=0)
    notes = {train_and_evaluate(t.config, context)["feature_cache"] for t in plan.trials}
    assert "linear probe on cached pre-logits" in notes and "off (nothing is frozen)" in notes
    assert len(asked) > 10 and set(asked) == {"fp32"}
