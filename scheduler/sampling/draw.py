"""A step's tokens drawn from its logits, on the device: the argmax, the argmax among what each row's grammar
allows, or the sampler. With grammars the host fills the masks; `draw_later` fills them on a helper thread
(TokenMasks.fill_later) while the engine's thread does the rest of its step, and draws once they are done."""

from __future__ import annotations

from concurrent.futures import Future
from operator import attrgetter

import torch

from scheduler.core.request import Request
from scheduler.sampling.batch import SamplingBatch
from scheduler.sampling.picking import argmax_only
from scheduler.sampling.rows import sampling_rows
from scheduler.sampling.sampler import Sampler, SamplerOutput
from scheduler.structured.guide import TokenMasks, masked_argmax

_GUIDE = attrgetter("guide")


class PendingDraw:
    """A step's draw, done (`result` at once) or waiting for its grammar masks."""

    def __init__(self, drawer: TokenDrawer | None = None, logits: torch.Tensor | None = None,
                 rows: SamplingBatch | None = None, masks: Future | None = None, out: SamplerOutput | None = None):
        self._drawer, self._logits, self._rows, self._masks, self._out = drawer, logits, rows, masks, out

    @property
    def waiting(self) -> bool:
        """Whether the draw waits for masks (result() then waits for the helper thread)."""
        return self._out is None

    def result(self) -> SamplerOutput:
        """The tokens, drawn now if they were waiting for the masks (rows: None takes the masked argmax)."""
        if self._out is None:
            drawer, logits, rows = self._drawer, self._logits, self._rows
            bitmask = drawer.masks.to_device(self._masks.result())
            if rows is None:
                self._out = SamplerOutput(masked_argmax(logits, bitmask), None, None, None)
            else:
                rows.token_bitmask = bitmask
                self._out = drawer.sampler(logits, rows)
            self._drawer = self._logits = self._rows = self._masks = None
        return self._out


class TokenDrawer:
    def __init__(self, sampler: Sampler, masks: TokenMasks, vocab_size: int, device: torch.device):
        self.sampler = sampler
        self.masks = masks
        self.vocab_size = vocab_size
        self.device = device

    def draw(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        """Each request's next token (and logprobs, where asked), on the device: nothing here waits for it.
        Greedy rows take the argmax of their logits, masked where a grammar constrains them (the logits are
        overwritten), without the sampler's rows."""
        guides = list(map(_GUIDE, requests))
        constrained = guides.count(None) != len(guides)
        if argmax_only(requests):
            token_ids = self.masks.argmax(logits, guides) if constrained else logits.argmax(dim=-1)
            return SamplerOutput(token_ids, None, None, None)
        rows = sampling_rows(requests, self.vocab_size, self.device)
        if constrained:
            rows.token_bitmask = self.masks.for_requests(guides)
        return self.sampler(logits, rows)

    def draw_later(self, logits: torch.Tensor, requests: list[Request]) -> PendingDraw:
        """draw(), with the grammar masks filled on the helper thread; done at once where no grammar constrains
        a row. How each row picks (and its sampling rows) is settled now, from the requests as they are; nothing
        may touch their grammars' matchers, nor run another forward pass over the logits' buffer, until
        result()."""
        guides = list(map(_GUIDE, requests))
        if not requests:
            return PendingDraw(out=SamplerOutput(logits.new_empty(0, dtype=torch.long), None, None, None))
        if guides.count(None) == len(guides):
            return PendingDraw(out=self.draw(logits, requests))
        rows = None if argmax_only(requests) else sampling_rows(requests, self.vocab_size, self.device)
        return PendingDraw(self, logits, rows, self.masks.fill_later(guides))
