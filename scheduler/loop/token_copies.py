"""What the host reads of a launched step: its tokens (and logprobs, where asked) packed into one int64 tensor and
copied to pinned host memory without waiting, then unpacked."""

from __future__ import annotations

import numpy as np
import torch

from scheduler.core.outputs import TokenLogprob
from scheduler.sampling.sampler import SamplerOutput


class TokenCopies:
    """Sampled tokens (and logprobs) to the host, one non-blocking copy a step into pinned memory. Two
    buffers, used in turn: a step's copy is under way while the host still reads the step before's."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.buffers = [torch.empty(0, dtype=torch.long) for _ in range(2)]
        self.events = [torch.cuda.Event() if self.cuda else None for _ in range(2)]
        self.turn = 0

    def start(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """values: int64, any shape."""
        turn, self.turn = self.turn, 1 - self.turn
        n = values.numel()
        if self.buffers[turn].shape[0] < n:
            self.buffers[turn] = torch.empty(max(n, 2 * self.buffers[turn].shape[0]), dtype=torch.long,
                                             pin_memory=self.cuda)
        host = self.buffers[turn][:n].view(values.shape)
        host.copy_(values, non_blocking=True)
        event = self.events[turn]
        if event is not None:
            event.record()
        return host, event


def packed(out: SamplerOutput) -> torch.Tensor:
    """The tokens, or [N, 2 + 2 * top] tokens, chosen logprobs, top logprobs and their ids: what the host
    reads of a launched step, in one int64 tensor (logprobs as the bits of float64s), for one copy."""
    if out.logprobs is None:
        return out.token_ids
    return torch.cat([out.token_ids.unsqueeze(1), out.logprobs.double().unsqueeze(1).view(torch.long),
                      out.top_logprobs.double().view(torch.long), out.top_token_ids], dim=1)


def unpacked(host: np.ndarray, num_top: int | None) -> tuple[list[int], list | None]:
    """packed's tokens and, where it holds them, their TokenLogprobs, one list a row (else None)."""
    if num_top is None:
        return host.tolist(), None
    values = host[:, 1:2 + num_top].view(np.float64)
    return host[:, 0].tolist(), [[lp] for lp in logprob_lists(host[:, 0], values[:, 0], values[:, 1:],
                                                                 host[:, 2 + num_top:])]


def logprob_lists(token_ids, chosen, top_values, top_ids) -> list[TokenLogprob]:
    ids, chosen = token_ids.tolist(), chosen.tolist()
    top_ids, top_values = top_ids.tolist(), top_values.tolist()
    return [TokenLogprob(t, lp, list(zip(ti, tv))) for t, lp, ti, tv in zip(ids, chosen, top_ids, top_values)]
