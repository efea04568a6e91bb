"""How a queued request reaches the scheduler: a structured one once its grammar is compiled; a prompt's later
completions (n > 1) once the first has computed the prompt's full blocks, which they then share instead of
computing again (each computes only the prompt's last, partial block itself)."""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Future, wait

from scheduler.core.kv_cache import BlockPool
from scheduler.core.outputs import RequestStream, TokenLogprob
from scheduler.core.request import Request
from scheduler.core.scheduler import Scheduler
from scheduler.structured.guide import Guide


class Live:
    """Engine-side companions of a request: its stream and detokenizer."""

    def __init__(self, request: Request, stream: RequestStream, detokenizer, grammar: Future | None = None,
                 deltas: bool = True):
        self.request = request
        self.stream = stream
        self.detokenizer = detokenizer
        self.grammar = grammar  # the compiled grammar of a structured request, until it is ready
        self.deltas = deltas  # the stream is told after every step with news (else at the end only)
        # A step's token needs no more than a stop check and, where the stream is told every step, an output: no
        # text, grammar or logprob to follow.
        self.plain = detokenizer is None and grammar is None and not request.params.logprobs
        self.logprobs: list[TokenLogprob] | None = [] if request.params.logprobs else None
        self.prompt_logprobs_sent = request.prompt_logprobs is None


    @property
    def num_sent_tokens(self) -> int:
        """Output tokens the stream has been told of (Request.num_sent_tokens, in the progress arrays)."""
        return self.request.num_sent_tokens

    @num_sent_tokens.setter
    def num_sent_tokens(self, value: int) -> None:
        self.request.num_sent_tokens = value


class Admission:
    """The groups (a request's n completions) between the engine's queue and the scheduler."""

    def __init__(self, scheduler: Scheduler, pool: BlockPool):
        self.scheduler, self.pool = scheduler, pool
        self.compiling: list[list[Live]] = []  # structured groups waiting for their grammar, in arrival order
        self.forks: dict[str, tuple[int, list[Live]]] = {}  # completions waiting to share the first's prompt

    def add(self, group: list[Live]) -> None:
        if group[0].grammar is not None:
            self.compiling.append(group)
        else:
            self._queue(group)

    def admit_compiled(self) -> list[tuple[list[Live], BaseException]]:
        """Queue the groups whose grammars are ready. Returns those whose grammar failed, with the error:
        the caller ends them."""
        failed, still = [], []
        for group in self.compiling:
            group = [live for live in group if not live.request.is_finished]  # aborted while compiling
            if not group:
                continue
            grammar = group[0].grammar
            if not grammar.done():
                still.append(group)
            elif (error := grammar.exception()) is not None:
                failed.append((group, error))
            else:
                try:
                    for live in group:
                        live.request.guide = Guide(grammar.result())
                except Exception as exc:  # noqa: BLE001 - this group's failure, not the step's
                    failed.append((group, exc))
                    continue
                self._queue(group)
        self.compiling = still
        return failed

    def wait_for_grammar(self, timeout: float) -> None:
        """Nothing to run until a grammar is ready: wait for one, briefly."""
        wait([group[0].grammar for group in self.compiling], timeout=timeout, return_when=FIRST_COMPLETED)

    def release_forks(self, live: dict[str, Live]) -> None:
        """Start the later completions whose first has computed (and still holds) the prompt's shared blocks;
        `live` finds an unfinished first by its sequence id."""
        for parent_id, (num_blocks, lives) in list(self.forks.items()):
            parent = live.get(parent_id)
            shared = num_blocks * self.pool.block_size
            if parent is not None and (parent.request.num_computed_tokens < shared
                                       or self.pool.num_held_tokens(parent.request) < shared):
                continue  # not computed yet, or preempted (its blocks freed) and computing them again
            del self.forks[parent_id]
            for child in lives:
                if child.request.is_finished:  # aborted while it waited
                    continue
                if parent is not None:
                    self.pool.fork(parent.request, child.request, num_blocks)
                self.scheduler.add(child.request)

    def clear(self) -> None:
        self.compiling.clear()
        self.forks.clear()

    def _queue(self, group: list[Live]) -> None:
        """Into the scheduler: the first completion now, the others once it has computed the prompt's full blocks
        (all but the block holding the last token)."""
        first, *rest = group
        self.scheduler.add(first.request)
        num_blocks = (first.request.num_prompt_tokens - 1) // self.pool.block_size
        if rest and num_blocks:
            self.forks[first.request.request_id] = (num_blocks, rest)
        else:
            for live in rest:
                self.scheduler.add(live.request)
