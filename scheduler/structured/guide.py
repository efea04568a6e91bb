"""A constrained request's grammar state (`Guide`), and one step's token masks for all constrained rows
(`TokenMasks`): built on the host by xgrammar, copied to the device once, applied there by the sampler."""

from __future__ import annotations

import numpy as np
import torch


class Guide:
    """One request's xgrammar matcher, kept in step with its output tokens. `end` is the output length at which
    the grammar completed (it accepted a stop token) or could not go on (it refused a token, which only happens
    when every token it allows was blocked), so the engine stops the request there."""

    def __init__(self, compiled_grammar):
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled_grammar)
        self.num_accepted = 0  # output tokens the matcher has taken
        self.end: int | None = None
        self.complete = False  # the grammar accepted a stop token (rather than refused one)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """What the grammar allows next, into bitmask's row. An ended guide leaves the row as it is: its request
        stopped on a token read after this step was scheduled, the row's token is dropped, and a terminated
        matcher has no next mask."""
        if self.end is None:
            self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_ids: list[int]) -> None:
        """The step's new output tokens; those after the end are ignored (the request stops there)."""
        for token_id in token_ids:
            if self.end is not None:
                return
            if self.matcher.accept_token(token_id):
                self.num_accepted += 1
                if self.matcher.is_terminated():
                    self.complete = True
                    self.end = self.num_accepted
            else:
                self.end = self.num_accepted  # the refused token is dropped

    def fill_drafts(self, draft_token_ids: list[int], bitmask: torch.Tensor, first_row: int) -> int:
        """Masks for verifying drafts: row first_row + i holds what the grammar allows after drafts[:i]. The
        matcher is walked through the drafts and stops at the first it refuses (or once it completes): a later
        draft can never be accepted, as its position's mask refused the one before it. Returns how many drafts
        were walked; `settle` rolls back those the verification rejected. An ended guide walks none: its
        request stopped on a token the host read after this step was scheduled, and the step's tokens for
        it are dropped (its matcher may have terminated, when it has no next mask)."""
        if self.end is not None:
            return 0
        self.fill(bitmask, first_row)
        walked = 0
        for i, token_id in enumerate(draft_token_ids):
            if self.matcher.is_terminated() or not self.matcher.accept_token(token_id):
                bitmask[first_row + i + 1:first_row + len(draft_token_ids) + 1] = -1  # never reached
                break
            walked += 1
            if self.matcher.is_terminated():
                bitmask[first_row + i + 1:first_row + len(draft_token_ids) + 1] = -1
                break
            self.fill(bitmask, first_row + i + 1)
        return walked

    def settle(self, walked: int, num_accepted: int, next_token_id: int) -> None:
        """After verification: keep the accepted drafts, roll back the rest, take the token that follows."""
        kept = min(walked, num_accepted)
        if walked > kept:
            self.matcher.rollback(walked - kept)
        self.num_accepted += kept
        if self.matcher.is_terminated():  # a drafted stop token was accepted: the request ends there
            self.complete = True
            self.end = self.num_accepted
            return
        self.accept([next_token_id])


class TokenMasks:
    """Builds each step's [rows, ceil(V/32)] int32 bitmask in one reused host buffer (-1 = every token allowed,
    for the rows no grammar constrains) and copies it to the device in one transfer."""

    def __init__(self, vocab_size: int, device: torch.device):
        self.vocab_size = vocab_size
        self.device = device
        self.width = (vocab_size + 31) // 32
        self._host = torch.empty(0, self.width, dtype=torch.int32)

    def rows(self, num_rows: int) -> torch.Tensor:
        """The host buffer for this step, every row allowing everything; fill the constrained rows."""
        if self._host.shape[0] < num_rows:
            self._host = torch.empty(max(num_rows, 2 * self._host.shape[0]), self.width, dtype=torch.int32,
                                     pin_memory=self.device.type == "cuda")
        host = self._host[:num_rows]
        host.fill_(-1)
        return host

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            return host  # the sampler is done with it before the next step refills it
        # The copy is done before the buffer is filled again: the host fills it only once it has read the
        # tokens of every step before (a launched step reads the one in flight first), and the copy precedes
        # them on the stream.
        return host.to(self.device, non_blocking=True)

    def for_requests(self, guides: list[Guide | None]) -> torch.Tensor:
        """One row per request: what its grammar allows next."""
        return self.to_device(self._fill(guides))

    def argmax(self, logits: torch.Tensor, guides: list[Guide | None]) -> torch.Tensor:
        """Each row's greedy token among those its grammar allows: what the sampler picks for a greedy row
        under the same mask. The logits are overwritten."""
        return masked_argmax(logits, self.for_requests(guides))

    def _fill(self, guides: list[Guide | None]) -> torch.Tensor:
        host = self.rows(len(guides))
        for row, guide in enumerate(guides):
            if guide is not None:
                guide.fill(host, row)
        return host


def masked_argmax(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Each row's argmax among the tokens its bitmask row allows. The logits are overwritten."""
    with torch.inference_mode():  # the forward pass's logits are inference tensors, masked in place
        apply_token_bitmask(logits, bitmask)
        return logits.argmax(dim=-1)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Disallowed tokens' logits to -inf, in place, on the logits' device."""
    if logits.device.type == "cpu":
        # xgrammar's CPU kernel tests the bits one by one; unpacked in bulk they mask ~3x faster.
        allowed = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :logits.shape[-1]]
        logits.masked_fill_(torch.from_numpy(allowed.view(np.bool_)).logical_not_(), float("-inf"))
        return
    import xgrammar as xgr

    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[-1])
