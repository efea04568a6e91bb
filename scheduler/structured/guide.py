"""A constrained request's grammar state (`Guide`), and one step's token masks for all constrained rows
(`TokenMasks`): built on the host by xgrammar, copied to the device once, applied there by the sampler."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch


class Guide:
    """One request's xgrammar matcher, kept in step with its output tokens. `end` is the output length at which
    the grammar completed (it accepted a stop token) or could not go on (it refused a token, which only happens
    when every token it allows was blocked), so the engine stops the request there.

    Where a step's masks were filled (TokenMasks.fill), a token is judged by its bit in the mask of the state it
    follows (xgrammar's masks are exact: the matcher takes a token if and only if its bit is set, and ends
    only on a stop token), and the matcher is given it with the next fill, off the engine's thread."""

    def __init__(self, compiled_grammar):
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled_grammar)
        # The matcher terminates only on accepting a stop token: other tokens need no is_terminated call.
        self.stop_token_ids = frozenset(self.matcher.stop_token_ids)
        self.num_accepted = 0  # output tokens the matcher has taken (or will, from `pending`)
        self.pending: list[int] = []  # tokens judged by their bits, not given to the matcher yet
        self.mask: np.ndarray | None = None  # what the matcher's state allows, until a token follows it
        self.end: int | None = None
        self.complete = False  # the grammar accepted a stop token (rather than refused one)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """What the grammar allows next, into bitmask's row. An ended guide leaves the row as it is: its request
        stopped on a token read after this step was scheduled, the row's token is dropped, and a terminated
        matcher has no next mask."""
        if self.end is None:
            self.flush()
            self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_ids: list[int]) -> None:
        """The step's new output tokens; those after the end are ignored (the request stops there)."""
        for token_id in token_ids:
            if self.end is not None:
                return
            mask, self.mask = self.mask, None
            if mask is not None:
                taken = bool((int(mask[token_id >> 5]) >> (token_id & 31)) & 1)
                if taken:
                    self.pending.append(token_id)
            else:
                self.flush()
                taken = self.matcher.accept_token(token_id)
            if not taken:
                self.end = self.num_accepted  # the refused token is dropped
                return
            self.num_accepted += 1
            if token_id in self.stop_token_ids and (mask is not None or self.matcher.is_terminated()):
                self.complete = True
                self.end = self.num_accepted

    def flush(self) -> None:
        """Give the matcher the tokens judged by their bits."""
        for token_id in self.pending:
            if not self.matcher.accept_token(token_id):
                raise RuntimeError(f"the grammar refused token {token_id}, which its mask allowed")
        self.pending = []

    def fill_drafts(self, draft_token_ids: list[int], bitmask: torch.Tensor, first_row: int) -> int:
        """Masks for verifying drafts: row first_row + i holds what the grammar allows after drafts[:i]. The
        matcher is walked through the drafts and stops at the first it refuses (or once it completes): a later
        draft can never be accepted, as its position's mask refused the one before it. Returns how many drafts
        were walked; `settle` rolls back those the verification rejected. An ended guide walks none: its
        request stopped on a token the host read after this step was scheduled, and the step's tokens for
        it are dropped (its matcher may have terminated, when it has no next mask)."""
        if self.end is not None:
            return 0
        self.mask = None  # the matcher is walked
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
        self.flush()
        self.mask = None
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
    for the rows no grammar constrains) and copies it to the device in one transfer. The constrained rows are
    filled by one call into xgrammar (BatchGrammarMatcher, one thread: at these batch sizes its own threads'
    hand-off costs more than the rows), which releases the GIL: `fill_later` runs it on a helper thread while
    the engine's thread does other work."""

    def __init__(self, vocab_size: int, device: torch.device):
        self.vocab_size = vocab_size
        self.device = device
        self.width = (vocab_size + 31) // 32
        self._host = torch.empty(0, self.width, dtype=torch.int32)
        self._batch = None  # xgrammar's BatchGrammarMatcher, made on the first fill
        self._helper: ThreadPoolExecutor | None = None  # made on the first fill_later

    def rows(self, num_rows: int, reset: bool = True) -> torch.Tensor:
        """The host buffer for this step, every row allowing everything (reset); fill the constrained rows."""
        if self._host.shape[0] < num_rows:
            self._host = torch.empty(max(num_rows, 2 * self._host.shape[0]), self.width, dtype=torch.int32,
                                     pin_memory=self.device.type == "cuda")
        host = self._host[:num_rows]
        if reset:
            host.fill_(-1)
        return host

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            return host  # the sampler is done with it before the next step refills it
        # The copy is done before the buffer is filled again: the host fills it only once it has read the
        # tokens of every step before (a launched step reads the one in flight first), and the copy precedes
        # them on the stream.
        return host.to(self.device, non_blocking=True)

    def fill(self, guides: list[Guide | None]) -> torch.Tensor:
        """One host row per request: what its grammar allows next (a row without a grammar, or whose grammar
        has ended, allows everything). Only the rows no grammar fills are reset."""
        live, free = [], []
        for row, guide in enumerate(guides):
            (live if guide is not None and guide.end is None else free).append(row)
        host = self.rows(len(guides), reset=False)
        if free:
            host.index_fill_(0, torch.tensor(free), -1)
        if live:
            if self._batch is None:
                import xgrammar as xgr

                self._batch = xgr.BatchGrammarMatcher(max_threads=1)
            filled = [guides[row] for row in live]
            _flush(filled)
            self._batch.batch_fill_next_token_bitmask([guide.matcher for guide in filled], host, live)
            for guide, mask in zip(filled, host.numpy()[live]):  # a copy: the buffer is filled again next step
                guide.mask = mask
        return host

    def fill_later(self, guides: list[Guide | None]) -> Future:
        """fill(guides) on the helper thread: a future of the host rows. Nothing may touch these guides' matchers
        (accept, roll back, fill) until it is done."""
        if self._helper is None:
            self._helper = ThreadPoolExecutor(1, thread_name_prefix="token-masks")
        return self._helper.submit(self.fill, guides)

    def for_requests(self, guides: list[Guide | None]) -> torch.Tensor:
        """One row per request, on the device: what its grammar allows next."""
        return self.to_device(self.fill(guides))

    def argmax(self, logits: torch.Tensor, guides: list[Guide | None]) -> torch.Tensor:
        """Each row's greedy token among those its grammar allows: what the sampler picks for a greedy row
        under the same mask. The logits are overwritten."""
        return masked_argmax(logits, self.for_requests(guides))


def _flush(guides: list[Guide]) -> None:
    """Guide.flush for them all; those with one token waiting (most) in one call."""
    import xgrammar as xgr

    ones = [guide for guide in guides if len(guide.pending) == 1]
    if ones and not all(xgr.BatchGrammarMatcher.batch_accept_token([g.matcher for g in ones],
                                                                   [g.pending[0] for g in ones])):
        raise RuntimeError("a grammar refused a token its mask allowed")
    for guide in ones:
        guide.pending = []
    for guide in guides:
        if guide.pending:
            guide.flush()


def masked_argmax(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Each row's argmax among the tokens its bitmask row allows. The logits are overwritten."""
    with torch.inference_mode():  # the forward pass's logits are inference tensors, masked in place
        # The lowest finite value picks as -inf does (a row allowing nothing takes its first token either way);
        # the CPU's argmax runs ~2x slower over rows full of -inf.
        apply_token_bitmask(logits, bitmask, torch.finfo(logits.dtype).min if logits.device.type == "cpu"
                            else float("-inf"))
        return logits.argmax(dim=-1)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, value: float = float("-inf")) -> None:
    """Disallowed tokens' logits to value (-inf), in place, on the logits' device."""
    if logits.device.type == "cpu":
        # xgrammar's CPU kernel tests the bits one by one; unpacked in bulk (the bits inverted first, so they
        # say which tokens are refused) they mask ~4x faster.
        refused = np.unpackbits(np.invert(bitmask.numpy()).view(np.uint8), axis=1, bitorder="little")
        np.copyto(logits.numpy(), value, where=refused[:, :logits.shape[-1]].view(np.bool_))
        return
    import xgrammar as xgr

    assert value == float("-inf"), "xgrammar's device kernel masks to -inf"
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[-1])
