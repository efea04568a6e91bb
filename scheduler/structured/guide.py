"""A constrained request's grammar state (`Guide`), and one step's token masks for all constrained rows
(`TokenMasks`): built on the host by xgrammar, copied to the device once, applied there by the sampler.

A grammar that fails (its matcher refuses a token its mask allowed, or raises) fails its own request only: the
guide records why (`Guide.error`), stops filling, and the engine ends that request with the error when it checks
the request's next tokens (`Guide.check`); the step and the other rows go on."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from scheduler.structured.compiler import library_message


class GrammarFailure(RuntimeError):
    """One request's grammar failed; that request ends with this error, the others go on."""


class Guide:
    """One request's xgrammar matcher, kept in step with its output tokens. `end` is the output length at which
    the grammar completed (it accepted a stop token) or could not go on (it refused a token, which only happens
    when every token it allows was blocked), so the engine stops the request there.

    Where a step's masks were filled (TokenMasks.fill), a token is judged by its bit in the mask of the state it
    follows (xgrammar's masks are exact: the matcher takes a token if and only if its bit is set, and ends
    only on a stop token), and the matcher is given it with the next fill, off the engine's thread; so are the
    rollbacks of rejected drafts (`settle`)."""

    # The fault injection seam for tests: the matcher is made to refuse the first token it is given, after its mask
    # allowed it, of this output index or later (what a matcher bug would do). None, always, outside tests.
    refuse_at: int | None = None

    def __init__(self, compiled_grammar):
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled_grammar)
        # The matcher terminates only on accepting a stop token: other tokens need no is_terminated call.
        self.stop_token_ids = frozenset(self.matcher.stop_token_ids)
        self.num_accepted = 0  # output tokens the matcher has taken (or will, from `pending`)
        self.rollback = 0  # drafts the matcher walked that verification rejected: undone before `pending`
        self.pending: list[int] = []  # tokens judged by their bits, not given to the matcher yet
        self.mask: np.ndarray | None = None  # what the matcher's state allows, until a token follows it
        self.end: int | None = None
        self.complete = False  # the grammar accepted a stop token (rather than refused one)
        self.error: str | None = None  # why the grammar failed, when it did

    @property
    def ended(self) -> bool:
        """Nothing more to fill or give the matcher: the grammar ended, or failed."""
        return self.end is not None or self.error is not None

    def fail(self, reason: str) -> None:
        """The grammar cannot go on: nothing more is filled or given to it, and `check` raises the reason. Only
        `error` tells (one write: the engine's thread may read the guide meanwhile); `end` is the grammar's own."""
        self.pending, self.rollback, self.mask = [], 0, None
        if self.error is None:
            self.error = f"structured_outputs: {reason}"

    def check(self) -> None:
        """GrammarFailure if the grammar failed: the engine ends the request with it."""
        if self.error is not None:
            raise GrammarFailure(self.error)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """What the grammar allows next, into bitmask's row. An ended guide leaves the row as it is: its request
        stopped on a token read after this step was scheduled, the row's token is dropped, and a terminated
        matcher has no next mask. A guide that fails here leaves the row allowing everything."""
        if not self.ended and self.flush():
            try:
                self.matcher.fill_next_token_bitmask(bitmask, row)
            except Exception as exc:  # noqa: BLE001 - this request's grammar alone
                self.fail(f"the grammar failed to fill its mask: {library_message(exc)}")
                bitmask[row] = -1

    def accept(self, token_ids: list[int]) -> None:
        """The step's new output tokens; those after the end are ignored (the request stops there)."""
        for token_id in token_ids:
            if self.ended:
                return
            mask, self.mask = self.mask, None
            if mask is not None:
                taken = bool((int(mask[token_id >> 5]) >> (token_id & 31)) & 1)
                if taken:
                    self.pending.append(token_id)
            elif not self.flush():
                return
            else:
                try:
                    taken = self.matcher.accept_token(token_id)
                except Exception as exc:  # noqa: BLE001 - this request's grammar alone
                    self.fail(f"the grammar failed on token {token_id}: {library_message(exc)}")
                    return
            if not taken:
                self.end = self.num_accepted  # the refused token is dropped
                return
            self.num_accepted += 1
            if token_id in self.stop_token_ids and (mask is not None or self.matcher.is_terminated()):
                self.complete = True
                self.end = self.num_accepted

    def flush(self) -> bool:
        """Undo the rejected drafts and give the matcher the tokens judged by their bits. False if the grammar
        failed (now or before)."""
        if self.error is not None:
            return False
        first = self.num_accepted - len(self.pending)
        try:
            if self.rollback:
                self.matcher.rollback(self.rollback)
                self.rollback = 0
            for i, token_id in enumerate(self.pending):
                injected = self.refuse_at is not None and first + i >= self.refuse_at
                if injected or not self.matcher.accept_token(token_id):
                    self.fail(f"the grammar refused token {token_id}, which its mask allowed")
                    return False
        except Exception as exc:  # noqa: BLE001 - this request's grammar alone
            self.fail(f"the grammar failed: {library_message(exc)}")
            return False
        self.pending = []
        return True

    def settle(self, drafts: list[int], walked: int, num_accepted: int, next_token_id: int,
               mask: np.ndarray | None = None) -> None:
        """After verification (TokenMasks.fill_drafts walked the matcher through `walked` of the drafts): keep the
        accepted drafts, roll back the rest, take the token that follows. mask: what the grammar allows after the
        kept drafts (their verified position's row), which judges that token; the rollback and the token reach
        the matcher with the next fill. Without it both reach it now."""
        if self.ended:
            return  # ended before (its drafts were not walked) or failed while walking them
        kept = min(walked, num_accepted)
        self.rollback, self.num_accepted = walked - kept, self.num_accepted + kept
        if kept and drafts[kept - 1] in self.stop_token_ids:  # a drafted stop token was accepted: it ends there
            self.complete = True
            self.end = self.num_accepted
            return
        self.mask = mask
        self.accept([next_token_id])


class TokenMasks:
    """Builds each step's [rows, ceil(V/32)] int32 bitmask in one reused host buffer (-1 = every token allowed,
    for the rows no grammar constrains) and copies it to the device in one transfer. The constrained rows are
    filled by one call into xgrammar (BatchGrammarMatcher, one thread: at these batch sizes its own threads'
    hand-off costs more than the rows), which releases the GIL: `fill_later` and `fill_drafts_later` run it on
    a helper thread while the engine's thread does other work."""

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
        filled = _flush([guide for guide in guides if guide is not None and not guide.ended])
        live, free = [], []
        for row, guide in enumerate(guides):
            (live if guide is not None and not guide.ended else free).append(row)
        host = self.rows(len(guides), reset=False)
        if free:
            host.index_fill_(0, torch.tensor(free), -1)
        if live:
            self._fill_rows(filled, host, live)
            for guide, mask in zip(filled, host.numpy()[live]):  # a copy: the buffer is filled again next step
                guide.mask = mask if guide.error is None else None
        return host

    def fill_drafts(self, guides: list[Guide | None], drafts: list[list[int]]) -> tuple[torch.Tensor, list[int]]:
        """Masks for verifying drafts: 1 + len(drafts[j]) host rows for request j, in order; its row i holds
        what its grammar allows after drafts[j][:i]. Each matcher walks its drafts and stops at the first it
        refuses (or once it completes): a later draft can never be accepted, as its position's mask refused the
        one before it, and its rows allow everything. Filled depth by depth, all rows of a depth in one call, the
        drafts taken in one call. Returns the rows and how many drafts each guide walked, for `settle` (a guide
        that walked none keeps its first row as its mask, as after `fill`). An ended
        guide walks none: its request stopped on a token read after this step was scheduled (its matcher may
        have terminated, when it has no next mask)."""
        firsts = np.cumsum([0] + [1 + len(d) for d in drafts])
        host = self.rows(int(firsts[-1]))
        walked = [0] * len(guides)
        walking = [j for j, guide in enumerate(guides) if guide is not None and not guide.ended]
        _flush([guides[j] for j in walking])
        depth = 0
        while walking := [j for j in walking if guides[j].error is None]:
            self._fill_rows([guides[j] for j in walking], host, (firsts[walking] + depth).tolist())
            going = [j for j in walking if depth < len(drafts[j]) and guides[j].error is None]
            tokens = [drafts[j][depth] for j in going]
            walking = []
            for j, token, taken in zip(going, tokens, _accept([guides[j].matcher for j in going], tokens)):
                if taken:
                    walked[j] += 1
                    if token not in guides[j].stop_token_ids:  # a stop token ends the matcher's walk
                        walking.append(j)
            depth += 1
        still = [j for j, guide in enumerate(guides) if guide is not None and not guide.ended and not walked[j]]
        for j, mask in zip(still, host.numpy()[firsts[still]]):  # a copy: the buffer is filled again next step
            guides[j].mask = mask  # not walked: its next token (no draft kept) is judged by the row's bit
        return host, walked

    def fill_later(self, guides: list[Guide | None]) -> Future:
        """fill(guides) on the helper thread: a future of the host rows. Nothing may touch these guides' matchers
        (accept, roll back, fill) until it is done."""
        return self._helper_thread().submit(self.fill, guides)

    def fill_drafts_later(self, guides: list[Guide | None], drafts: list[list[int]]) -> Future:
        """fill_drafts on the helper thread: a future of (host rows, walked); the same rule as fill_later."""
        return self._helper_thread().submit(self.fill_drafts, guides, drafts)

    def shutdown(self) -> None:
        """Stop the helper thread (waiting for a fill under way): the engine is shutting down."""
        if self._helper is not None:
            self._helper.shutdown(wait=True, cancel_futures=True)
            self._helper = None

    def for_requests(self, guides: list[Guide | None]) -> torch.Tensor:
        """One row per request, on the device: what its grammar allows next."""
        return self.to_device(self.fill(guides))

    def argmax(self, logits: torch.Tensor, guides: list[Guide | None]) -> torch.Tensor:
        """Each row's greedy token among those its grammar allows: what the sampler picks for a greedy row
        under the same mask. The logits are overwritten."""
        return masked_argmax(logits, self.for_requests(guides))

    def _helper_thread(self) -> ThreadPoolExecutor:
        if self._helper is None:
            self._helper = ThreadPoolExecutor(1, thread_name_prefix="token-masks")
        return self._helper

    def _fill_rows(self, guides: list[Guide], host: torch.Tensor, rows: list[int]) -> None:
        """The guides' masks into the host rows, in one call; where that call fails (one matcher's error fails
        it all), each alone, so a failing grammar fails its own guide only."""
        if self._batch is None:
            import xgrammar as xgr

            self._batch = xgr.BatchGrammarMatcher(max_threads=1)
        try:
            self._batch.batch_fill_next_token_bitmask([guide.matcher for guide in guides], host, rows)
        except Exception:  # noqa: BLE001 - which grammar failed is found row by row
            for guide, row in zip(guides, rows):
                guide.fill(host, row)


def settle_drafts(guides: list[Guide | None], drafts: list[list[int]], walked: list[int], num_accepted: list[int],
                  next_tokens: list[int], host: torch.Tensor) -> None:
    """Guide.settle for each verified row that has a guide. host: the rows TokenMasks.fill_drafts filled (not
    filled again since); each guide's next token is judged by the row of the position it follows."""
    firsts = np.cumsum([0] + [1 + len(d) for d in drafts])
    settling = [j for j, guide in enumerate(guides) if guide is not None and not guide.ended]
    if not settling:
        return
    rows = [int(firsts[j]) + min(walked[j], num_accepted[j]) for j in settling]
    for j, mask in zip(settling, host.numpy()[rows]):  # a copy: the buffer is filled again next step
        guides[j].settle(drafts[j], walked[j], num_accepted[j], next_tokens[j], mask)


def _flush(guides: list[Guide]) -> list[Guide]:
    """Guide.flush for them all (those with one token waiting and nothing to roll back, most, in one call).
    Returns those whose grammar has not failed."""
    ones = [guide for guide in guides if len(guide.pending) == 1 and not guide.rollback and guide.refuse_at is None]
    tokens = [guide.pending[0] for guide in ones]
    for guide, token_id, taken in zip(ones, tokens, _accept([guide.matcher for guide in ones], tokens)):
        guide.pending = []
        if not taken:
            guide.fail(f"the grammar refused token {token_id}, which its mask allowed")
    return [guide for guide in guides if guide.flush()]


def _accept(matchers: list, tokens: list[int]) -> list[bool]:
    """Each matcher takes its token (or refuses it), in one call."""
    if not matchers:
        return []
    import xgrammar as xgr

    return xgr.BatchGrammarMatcher.batch_accept_token(matchers, tokens)


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
