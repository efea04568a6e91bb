"""What a step computed, and how it reaches the requests (Scheduler.update_from_output applies it, once): the step's
output as plain rows, and what applying it put on the requests, row by row (StepResult) or, for the rows that only
took one token, as columns (PlainTokens)."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import compress

import numpy as np

from scheduler.core.progress import Progress
from scheduler.core.request import Request, RequestStatus


@dataclass(slots=True)
class StepResult:
    """A request's new tokens from one step, already on the request, for the engine's stop checks and outputs."""

    request: Request
    new_token_ids: list[int]
    logprobs: list | None  # a TokenLogprob for each new token, where the request asks
    num_drafts: int = 0
    num_accepted: int = 0


@dataclass(slots=True, eq=False)
class PlainTokens:
    """The rows of a step without drafts or logprobs that took their token (requests[i] took token_ids[i]; slots:
    their Progress slots), as columns: no object a row. Iterating or indexing gives a row's StepResult."""

    requests: list[Request]
    token_ids: list[int]
    slots: np.ndarray

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self):
        return (StepResult(r, [t], None) for r, t in zip(self.requests, self.token_ids))

    def __getitem__(self, i: int) -> StepResult:
        return StepResult(self.requests[i], [self.token_ids[i]], None)


@dataclass(slots=True)
class StepOutput:
    """What one step sampled or verified, row by row, before any of it is on the requests: row i is requests[i]'s.
    token_ids[i] is its sampled token (after verification: the token that follows the accepted drafts);
    drafts[i] and num_accepted[i] its verified drafts and how many were accepted (None: a step without
    verification); logprobs[i] the TokenLogprobs of its new tokens (None: nobody asked). in_flight: a launched
    step's, whose rows stood as placeholders until now. slots: the requests' Progress slots, where the step knows
    them. Scheduler.update_from_output applies it, once."""

    requests: list[Request]
    token_ids: list[int]
    logprobs: list | None = None
    drafts: list[list[int]] | None = None
    num_accepted: list[int] | None = None
    in_flight: bool = False
    applied: bool = False
    slots: np.ndarray | None = None


def apply_rows(out: StepOutput) -> list[StepResult]:
    """A step's output applied row by row (drafts or logprobs to report). A request that has ended since the step
    was launched takes none; accepted drafts join the output and their KV (computed in the verification pass)
    counts as computed; a sampled token also advances its grammar (a verified one's was settled by verification)."""
    results = []
    for i, (request, token) in enumerate(zip(out.requests, out.token_ids)):
        if out.in_flight:
            request.num_placeholders -= 1
        if request.is_finished:
            continue
        num_drafts = num_accepted = 0
        if out.drafts is None:
            new_tokens = [token]
            if request.guide is not None:
                request.guide.accept(new_tokens)
        else:
            drafts, num_accepted = out.drafts[i], out.num_accepted[i]
            new_tokens, num_drafts = drafts[:num_accepted] + [token], len(drafts)
            if out.in_flight and not request.num_placeholders:
                request.num_drafts_in_flight = 0  # no step of its own is in flight any more
            if request.status == RequestStatus.RUNNING:  # preempted meanwhile: all is computed again
                request.num_computed_tokens += num_accepted
            request.num_draft_tokens += num_drafts
            request.num_accepted_tokens += num_accepted
        for token_id in new_tokens:
            request.append_token(token_id)
        logprobs = out.logprobs[i] if out.logprobs is not None and request.params.logprobs else None
        results.append(StepResult(request, new_tokens, logprobs, num_drafts, num_accepted))
    return results


def apply_tokens(progress: Progress, out: StepOutput) -> PlainTokens:
    """A step's output of one token a row, nothing else to report (most steps), applied by array operations: the
    placeholders counted off, the tokens appended (held in the progress arrays until their lists are read), the
    grammars of the rows that have one advanced. A request that has ended since the step was launched takes none."""
    requests, tokens = out.requests, out.token_ids
    slots = out.slots if out.slots is not None else progress.slots_of(requests)
    if out.in_flight:
        progress.placeholders[slots] -= 1  # an ended request's slot too: harmless, it is not reused yet
    ended = progress.finished[slots]
    if ended.any():
        if out.in_flight:  # an ended request's numbers are its own again
            for i in np.flatnonzero(ended).tolist():
                requests[i].num_placeholders -= 1
        taken = ~ended
        requests, tokens, slots = list(compress(requests, taken)), list(compress(tokens, taken)), slots[taken]
    progress.append(requests, slots, np.array(tokens, dtype=np.int64))
    if progress.guided[slots].any():
        for i in np.flatnonzero(progress.guided[slots]).tolist():
            requests[i].guide.accept([tokens[i]])
    return PlainTokens(requests, tokens, slots)

