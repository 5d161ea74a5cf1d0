"""The training loop's failure messages: divergence and running out of memory say what to change."""
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
