"""A step's tokens drawn from its logits, on the device: the argmax, the argmax among what each row's grammar
allows, or the sampler. With grammars the host fills the masks; `draw_later` fills them on a helper thread
(TokenMasks.fill_later) while the engine's thread does the rest of its step, and draws once they are done."""

from __future__ import annotations

from concurrent.futures import Future
from operator import attrgetter

import numpy as np
import torch

from scheduler.core.progress import Progress
from scheduler.core.request import Request
from scheduler.sampling.batch import SamplingBatch
from scheduler.sampling.picking import argmax_only
from scheduler.sampling.rows import plain_rows, sampling_rows
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
    def __init__(self, sampler: Sampler, masks: TokenMasks, vocab_size: int, device: torch.device,
                 progress: Progress | None = None):
        """progress: the scheduler's Progress arrays, where a step's rows (by their slots) are read at once."""
        self.sampler = sampler
        self.masks = masks
        self.vocab_size = vocab_size
        self.device = device
        self.progress = progress

    def draw(self, logits: torch.Tensor, requests: list[Request], slots: np.ndarray | None = None,
             filled: torch.Tensor | None = None) -> SamplerOutput:
        """Each request's next token (and logprobs, where asked), on the device: nothing here waits for it.
        Greedy rows take the argmax of their logits, masked where a grammar constrains them (the logits are
        overwritten), without the sampler's rows. slots: the requests' Progress slots, where known. filled: the
        rows' grammar masks on the host, filled already (TokenMasks.fill_drafts, no drafts)."""
        constrained = filled is not None or self._constrained(requests, slots)
        if constrained:
            bitmask = self.masks.to_device(filled) if filled is not None \
                else self.masks.for_requests(list(map(_GUIDE, requests)))
        if self._argmax_only(requests, slots):
            token_ids = masked_argmax(logits, bitmask) if constrained else logits.argmax(dim=-1)
            return SamplerOutput(token_ids, None, None, None)
        rows = self._rows(requests, slots)
        if constrained:
            rows.token_bitmask = bitmask
        return self.sampler(logits, rows)

    def draw_later(self, logits: torch.Tensor, requests: list[Request], slots: np.ndarray | None = None
                   ) -> PendingDraw:
        """draw(), with the grammar masks filled on the helper thread; done at once where no grammar constrains
        a row. How each row picks (and its sampling rows) is settled now, from the requests as they are; nothing
        may touch their grammars' matchers, nor run another forward pass over the logits' buffer, until
        result()."""
        if not requests:
            return PendingDraw(out=SamplerOutput(logits.new_empty(0, dtype=torch.long), None, None, None))
        if not self._constrained(requests, slots):
            return PendingDraw(out=self.draw(logits, requests, slots))
        rows = None if self._argmax_only(requests, slots) else self._rows(requests, slots)
        return PendingDraw(self, logits, rows, self.masks.fill_later(list(map(_GUIDE, requests))))

    def _constrained(self, requests: list[Request], slots: np.ndarray | None) -> bool:
        """Whether a grammar constrains any row: one array look where the slots are known."""
        if slots is not None and self.progress is not None:
            return bool(self.progress.guided[slots].any())
        return list(map(_GUIDE, requests)).count(None) != len(requests)

    def _argmax_only(self, requests: list[Request], slots: np.ndarray | None) -> bool:
        if slots is not None and self.progress is not None and self.progress.argmax_always[slots].all():
            return True
        return argmax_only(requests)

    def _rows(self, requests: list[Request], slots: np.ndarray | None) -> SamplingBatch:
        """The sampling rows: from the progress arrays where the rows' parameters alone decide (plain_rows)."""
        rows = None
        if slots is not None and self.progress is not None:
            rows = plain_rows(self.progress, slots, requests, self.vocab_size, self.device)
        return rows if rows is not None else sampling_rows(requests, self.vocab_size, self.device)
