"""An EAGLE head as proposer: k drafts per speculating sequence from the target's own hidden states,
batched, chained on the device (each pass reads the last one's tokens and hidden states from there).

The target keeps the residual streams after the head's layers at every token it computes
(CausalLM.keep_aux_hidden_states); after each target pass the head takes them as features
(observe_forward). Head row t (position t of the request, the same block tables as the target's)
needs feature t and token t + 1, so a row waits, pending, until its next token is known: rows whose
next token the prompt already holds (prefill chunks) have their keys and values written in the
target's step; the rest, at most a verification's worth, are the first pass of the next proposal.
Rows past the accepted tokens are rolled back by counting (`held` never passes the target's computed
tokens), a preemption by starting over: bookkeeping, never data motion. Blocks taken from the prefix
cache hold the head's rows too, since the head writes the same slots as the target.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from weakref import WeakKeyDictionary

import numpy as np
import torch

from scheduler.config import EngineConfig
from scheduler.core.kv_cache import BlockPool
from scheduler.core.request import Request
from scheduler.core.scheduler import ScheduledRequest
from scheduler.sampling.rows import draft_rows
from scheduler.sampling.sampler import Sampler
from scheduler.speculative.eagle import files
from scheduler.speculative.eagle.head import EagleHead
from scheduler.speculative.eagle.runner import HeadRunner
from scheduler.speculative.proposer import Proposal, ProposerContext
from scheduler.worker.models import LoadedModel
from scheduler.worker.packing import ForwardItem

log = logging.getLogger(__name__)


@dataclass
class HeadRows:
    """One request's rows in the head: rows [0, held) written, features of rows [held, held + len(pending))
    waiting for their next token, features of a verification's rows until its acceptance is known."""

    held: int
    preemptions: int
    pending: torch.Tensor | None = None
    verifying: torch.Tensor | None = None

    @property
    def end(self) -> int:
        return self.held + (0 if self.pending is None else self.pending.shape[0])

    def take(self, count: int) -> torch.Tensor:
        """The first count pending features, now written."""
        taken, self.pending = self.pending[:count], self.pending[count:] if count < self.pending.shape[0] else None
        self.held += count
        return taken

    def cut(self, end: int) -> None:
        """Forget rows from `end` on (rows the target recomputes, or has not computed)."""
        if end <= self.held:
            self.held, self.pending = end, None
        elif end < self.end:
            self.pending = self.pending[:end - self.held]


def load_eagle_head(config: EngineConfig, target: LoadedModel, dtype: torch.dtype, device: torch.device) -> EagleHead:
    """The head config.eagle_head names, else the one shipped for this target; ValueError names the problem."""
    path = config.eagle_head
    if path is None:
        path = files.shipped_head_for(target)
        if path is None:
            raise ValueError("speculative='eagle' needs eagle_head (--eagle-head): no head shipped with beastserve "
                             f"(in {files.SHIPPED_HEADS}) was made for this target")
        log.info("EAGLE head: %s, shipped for this target", path)
    try:
        return files.load_head(path, target, dtype, device)
    except (ValueError, OSError) as exc:
        raise ValueError(f"eagle_head: {exc}") from None


class EagleProposer:
    needs_hidden_states = False  # it reads the aux streams of every target pass instead (observe_forward)
    max_positions = None

    def __init__(self, head: EagleHead, target: LoadedModel, config: EngineConfig, sampler: Sampler,
                 dtype: torch.dtype, device: torch.device):
        self.head, self.config, self.sampler = head, config, sampler
        self.dtype, self.device = dtype, device
        self.kv_model_config = head.llama_config  # one layer: the memory plan gives each block room for it
        self.aux_layers = head.layer_ids
        self.vocab_size = target.config.vocab_size
        # Rows written during the target's step once a request has this many waiting: prefill chunks, and
        # decodes that went on without drafts; fewer wait for the proposal's first pass.
        self.fill_at = config.max_query_len
        max_tokens = max(config.max_num_batched_tokens, config.max_num_seqs * config.max_query_len)
        target.model.keep_aux_hidden_states(self.aux_layers, max_tokens)
        self.runner: HeadRunner | None = None  # once prepared
        self._rows: WeakKeyDictionary[Request, HeadRows] = WeakKeyDictionary()

    @classmethod
    def create(cls, ctx: ProposerContext) -> EagleProposer:
        head = load_eagle_head(ctx.config, ctx.target, ctx.dtype, ctx.device)
        return cls(head, ctx.target, ctx.config, ctx.sampler, ctx.dtype, ctx.device)

    def prepare(self, num_blocks: int, max_model_len: int) -> None:
        self.runner = HeadRunner(self.head, num_blocks, self.config.block_size, self.dtype, self.device)

    def observe_forward(self, batch: list[ScheduledRequest], items: list[ForwardItem], aux: torch.Tensor) -> None:
        """After a target pass over items (batch's, in order): aux [rows, width], its streams at every row."""
        starts = np.cumsum([0] + [len(it.token_ids) for it in items])
        chosen = [i for i, s in enumerate(batch) if s.request.speculative and not s.request.is_finished]
        if not chosen:
            return
        if len(chosen) != len(batch):
            aux = aux[torch.from_numpy(np.concatenate([np.arange(starts[i], starts[i + 1]) for i in chosen]))
                      .to(aux.device)]
            starts = np.cumsum([0] + [len(items[i].token_ids) for i in chosen])
        features = self.head.fuse(aux)
        for n, i in enumerate(chosen):
            s, item = batch[i], items[i]
            rows = self._rows_of(s.request, item.start)
            rows.cut(item.start)
            if rows.end != item.start:  # rows the target never showed the head: left as the cache holds them
                rows.held, rows.pending = item.start, None
            mine, rows.verifying = features[starts[n]:starts[n + 1]], None
            if s.draft_token_ids:  # which rows count is known after verification (observe)
                rows.verifying = mine.clone()
            else:
                rows.pending = mine if rows.pending is None else torch.cat([rows.pending, mine])
        self._fill([(batch[i].request, items[i].block_table) for i in chosen])

    def observe(self, spec: list[ScheduledRequest], num_accepted: list[int], hidden_states) -> None:
        """The verified rows that were accepted (and the one after them) wait for the next proposal."""
        for s, accepted in zip(spec, num_accepted):
            rows = self._rows.get(s.request)
            if rows is None or rows.verifying is None:
                continue
            mine, rows.verifying = rows.verifying[:accepted + 1], None
            rows.pending = mine if rows.pending is None else torch.cat([rows.pending, mine])

    def propose(self, spec: list[ScheduledRequest], pool: BlockPool) -> Proposal:
        """Draft s.num_spec_slots tokens for each s, on the device (Proposal.device_drafts, row r for
        spec[r]); q where some request drafts by sampling. s.draft_token_ids gets placeholders."""
        ks = [s.num_spec_slots for s in spec]
        depth, device = max(ks), self.device
        tables = [pool.block_table(s.request.request_id) for s in spec]
        # The first pass: every row still waiting, decodes (one row) first as packing wants.
        first = [self._catch_up(s.request, table) for s, table in zip(spec, tables)]
        order = sorted(range(len(spec)), key=lambda r: len(first[r][0].token_ids) != 1)
        hidden = self.runner.run([first[r][0] for r in order], torch.cat([first[r][1] for r in order]))
        hidden = hidden[torch.from_numpy(np.argsort(order)).to(device)] if order != sorted(order) else hidden
        batch = self._sampling(spec, range(len(spec)))
        q = None if batch is None else torch.zeros(len(spec), depth, self.vocab_size, device=device)
        drafted = torch.zeros(len(spec), depth, dtype=torch.long, device=device)
        active = list(range(len(spec)))
        for j in range(depth):
            tokens = self._pick(hidden, batch, q, active, j)
            drafted[active if len(active) != len(spec) else slice(None), j] = tokens
            still = [n for n, r in enumerate(active) if ks[r] > j + 1]
            if not still:
                break
            if len(still) != len(active):
                keep = torch.tensor(still, device=device)
                tokens, hidden = tokens[keep], hidden[keep]
                active = [active[n] for n in still]
                batch = self._sampling(spec, active)
            # Pass j + 1 reads draft j + 1 and the head's own output at the row after the last.
            items = [ForwardItem([0], spec[r].request.num_tokens - 1 + j, tables[r], 1) for r in active]
            hidden = self.runner.run(items, hidden, tokens)
        for s, k in zip(spec, ks):
            s.draft_token_ids = [0] * k
        return Proposal(drafted, q)

    def _pick(self, hidden, batch, q, active: list[int], j: int) -> torch.Tensor:
        logits = self.head.logits(hidden).float()
        if batch is None:
            return self.head.token_ids(logits.argmax(dim=-1))
        probs = self.sampler.compute_probs(self.head.full_vocab_logits(logits), batch)
        q[torch.tensor(active, device=self.device), j] = probs
        return self.sampler.sample_probs(probs, batch)

    def _sampling(self, spec: list[ScheduledRequest], rows):
        return draft_rows([spec[r].request for r in rows], self.vocab_size, self.device)

    def _rows_of(self, request: Request, start: int) -> HeadRows:
        rows = self._rows.get(request)
        if rows is None or rows.preemptions != request.num_preemptions:
            rows = self._rows[request] = HeadRows(start, request.num_preemptions)
        return rows

    def _catch_up(self, request: Request, table: list[int]) -> tuple[ForwardItem, torch.Tensor]:
        """Rows [held, num_tokens - 1): feature t and token t + 1 each; the last one's output drafts."""
        rows, last = self._rows_of(request, request.num_tokens - 1), request.num_tokens - 1
        rows.cut(last)
        if rows.end < last:  # no features for these rows (never shown): start from the last one, featureless
            rows.held, rows.pending = last - 1, None
        if rows.held == last:  # its last row's feature is gone: drafts from the token alone
            rows.held = last - 1
        if rows.pending is None:
            rows.pending = torch.zeros(last - rows.held, self.head.hidden_size, dtype=self.dtype, device=self.device)
        start = rows.held
        features = rows.take(last - start)
        return ForwardItem(request.all_token_ids[start + 1:last + 1], start, table, 1), features

    def _fill(self, requests: list[tuple[Request, list[int]]]) -> None:
        """Write the keys and values of the rows that have waited long enough and whose next token is known
        (requests: with their block tables)."""
        ready = []
        for request, table in requests:
            rows = self._rows[request]
            count = min(rows.end, request.num_tokens - 1) - rows.held
            if count >= self.fill_at:
                tokens = request.all_token_ids[rows.held + 1:rows.held + 1 + count]
                ready.append((ForwardItem(tokens, rows.held, table, 0), rows.take(count)))
        if ready:
            ready.sort(key=lambda r: len(r[0].token_ids) != 1)
            self.runner.fill([item for item, _ in ready], torch.cat([f for _, f in ready]))
