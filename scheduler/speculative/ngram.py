"""Prompt lookup: propose what followed the most recent earlier occurrence of the sequence's tail."""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary

from scheduler.core.request import Request
from scheduler.speculative.proposer import Proposal, ProposerContext

if TYPE_CHECKING:
    from scheduler.core.kv_cache import BlockPool
    from scheduler.core.scheduler import ScheduledRequest

TOKEN_BYTES = array("i").itemsize  # bytes per token id in a packed history


def pack(token_ids: list[int]) -> bytes:
    return array("i", token_ids).tobytes()


def propose_ngram(token_ids: list[int], k: int, n_min: int, n_max: int, packed: bytes | None = None) -> list[int]:
    """Up to k tokens after the latest earlier place where the longest tail (n_max tokens down
    to n_min) occurred. `packed` is pack(token_ids), when the caller keeps one. Each tail length
    is one bytes.rfind over the packed history, so a step costs little even for long histories."""
    history = pack(token_ids) if packed is None else packed
    last = len(token_ids) - 1
    for n in range(min(n_max, last), max(n_min, 1) - 1, -1):
        tail = history[(last - n + 1) * TOKEN_BYTES:(last + 1) * TOKEN_BYTES]
        end = last * TOKEN_BYTES  # an earlier occurrence ends before the last token
        while (start := history.rfind(tail, 0, end)) >= 0:
            if start % TOKEN_BYTES == 0:  # not a match straddling token boundaries
                match_end = start // TOKEN_BYTES + n
                return token_ids[match_end:match_end + k]
            end = start + len(tail) - 1
    return []


class NgramProposer:
    """propose_ngram over each request's history, packed once and extended as tokens arrive."""

    kv_model_config = None
    max_positions = None
    needs_hidden_states = False
    aux_layers = None

    def __init__(self, n_min: int, n_max: int):
        self.n_min, self.n_max = n_min, n_max
        self._packed: WeakKeyDictionary[Request, bytearray] = WeakKeyDictionary()

    @classmethod
    def create(cls, ctx: ProposerContext) -> NgramProposer:
        return cls(ctx.config.ngram_min, ctx.config.ngram_max)

    def prepare(self, num_blocks: int, max_model_len: int) -> None:
        pass  # lookups need no memory of their own

    def propose(self, spec: list[ScheduledRequest], pool: BlockPool) -> Proposal:
        for s in spec:
            s.draft_token_ids = self.lookup(s.request, s.num_spec_slots)
        return Proposal()

    def observe(self, spec, num_accepted, hidden_states) -> None:
        pass  # a lookup learns nothing from verification

    def lookup(self, request: Request, k: int) -> list[int]:
        return propose_ngram(request.all_token_ids, k, self.n_min, self.n_max, self._history(request))

    def _history(self, request: Request) -> bytearray:
        tokens = request.all_token_ids
        packed = self._packed.get(request)
        if packed is None or len(packed) > len(tokens) * TOKEN_BYTES:  # new, or truncated at a stop
            packed = self._packed[request] = bytearray(pack(tokens))
        elif len(packed) < len(tokens) * TOKEN_BYTES:
            packed += pack(tokens[len(packed) // TOKEN_BYTES:])
        return packed
