"""The model runner's packing helpers, and tokens it reads from the device instead of the host."""

from __future__ import annotations

import numpy as np
import torch

from scheduler.worker.models import load_model
from scheduler.worker.packing import ForwardItem, device_token_patch, logits_indices
from scheduler.worker.runner import ModelRunner
from tests.conftest import tiny_config


def test_logits_rows_are_each_sequences_last_ones():
    # Sequences of 3, 1 and 4 tokens laid end to end, wanting logits for 0, 1 and 2 trailing tokens.
    rows = logits_indices(np.array([3, 1, 4]), np.array([0, 1, 2]))
    assert rows.tolist() == [3, 6, 7]


def test_device_tokens_land_in_their_items_trailing_places():
    items = [ForwardItem([5, 6, 0, 0], 10, [0], 3, device_row=1, num_device_tokens=2),
             ForwardItem([7], 4, [1], 1),
             ForwardItem([8, 0], 2, [2], 2, device_row=0, num_device_tokens=1)]
    dest, src = device_token_patch(items, row_width=3)
    assert dest.tolist() == [2, 3, 6] and src.tolist() == [3, 4, 0]
    assert device_token_patch(items[1:2], row_width=3) is None


def test_forward_with_device_held_drafts_equals_forward_with_them_known():
    model = load_model(tiny_config(), None, "dummy", torch.float32, torch.device("cpu"), None).model
    runner = ModelRunner(model, num_blocks=16, block_size=4, dtype=torch.float32, device=torch.device("cpu"))
    history = [[3, 1, 4, 1, 5], [9, 2, 6], [8, 8]]
    tables = [[0, 1, 2], [3, 4], [5]]
    runner.forward([ForwardItem(h, 0, t, 1) for h, t in zip(history, tables)])
    drafts = torch.tensor([[11, 12, 13], [21, 22, 0]])
    known = [ForwardItem([5, 11, 12, 13], 5, tables[0], 4), ForwardItem([7], 2, tables[2], 1),
             ForwardItem([6, 21, 22], 3, tables[1], 3)]
    held = [ForwardItem([5, 0, 0, 0], 5, tables[0], 4, 0, 3), ForwardItem([7], 2, tables[2], 1),
            ForwardItem([6, 0, 0], 3, tables[1], 3, 1, 2)]
    expected = runner.forward(known)  # the held pass then rewrites the same KV slots with the same values
    assert torch.equal(runner.forward(held, device_tokens=drafts), expected)
