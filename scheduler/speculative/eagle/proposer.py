"""An EAGLE head as proposer: k drafts per speculating sequence from the target's own hidden states,
batched, chained on the device (each pass reads the last one's tokens and hidden states from there).

The target keeps the residual streams after the head's layers at every token it computes
(CausalLM.keep_aux_hidden_states); after each target pass they are fused into features and stored at
the tokens' slots in the head's feature cache (observe_forward), paged like its KV cache through the
target's block tables. Head row t (position t) reads feature t and token t + 1, so it waits until
token t + 1 is known: rows the prompt already covers (prefill chunks) have their keys and values
written in the target's step; the rest, at most a verification's worth, are the first pass of the next
proposal. The only state is how many rows of each request the head has written (`held`): rows past
the accepted tokens are rolled back by counting (a verification's rejected rows, the chained drafts'
rows), a preemption by starting over: bookkeeping, never data motion. Blocks from the prefix cache hold
the head's rows too, since the head writes the same slots as the target.
"""

from __future__ import annotations

import logging
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
from scheduler.speculative.eagle.runner import HeadRunner, planned_config
from scheduler.speculative.proposer import Proposal, ProposerContext
from scheduler.tensors import to_device
from scheduler.worker.models import LoadedModel
from scheduler.worker.packing import ForwardItem, StepInputs, as_inputs

log = logging.getLogger(__name__)


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
    needs_hidden_states = False  # it reads the kept streams of every target pass instead (observe_forward)
    max_positions = None

    def __init__(self, head: EagleHead, target: LoadedModel, config: EngineConfig, sampler: Sampler,
                 dtype: torch.dtype, device: torch.device):
        self.head, self.config, self.sampler = head.requires_grad_(False), config, sampler
        self.dtype, self.device = dtype, device
        self.kv_model_config = planned_config(head)  # the memory plan gives each block room for the head
        self.aux_layers = head.layer_ids
        self.vocab_size = target.config.vocab_size
        # Rows written during the target's step once a request has this many waiting (prefill chunks, and
        # decodes that went on without drafts); fewer wait for the proposal's first pass.
        self.fill_at = config.max_query_len
        max_tokens = max(config.max_num_batched_tokens, config.max_num_seqs * config.max_query_len)
        target.model.keep_aux_hidden_states(self.aux_layers, max_tokens)
        self.runner: HeadRunner | None = None  # once prepared
        # request -> (rows of its history the head has written, the request's preemptions then)
        self._held: WeakKeyDictionary[Request, tuple[int, int]] = WeakKeyDictionary()
        self._launched: tuple[object, set[Request]] | None = None  # the last loop proposal's step and requests

    @classmethod
    def create(cls, ctx: ProposerContext) -> EagleProposer:
        head = load_eagle_head(ctx.config, ctx.target, ctx.dtype, ctx.device)
        return cls(head, ctx.target, ctx.config, ctx.sampler, ctx.dtype, ctx.device)

    def prepare(self, num_blocks: int, max_model_len: int) -> None:
        config = self.config
        self.runner = HeadRunner(self.head, num_blocks, config.block_size, self.dtype, self.device)
        if self.runner.fused and not config.enforce_eager:
            # A greedy proposal (the catch-up pass and up to k - 1 chained passes) is one graph replay.
            self.runner.capture_graphs(config.max_num_seqs, config.max_query_len, max_model_len,
                                       config.num_speculative_tokens - 1)

    def observe(self, spec, num_accepted, hidden_states) -> None:
        pass  # the rows past the accepted tokens are not counted: the next catch-up rewrites them

    def observe_forward(self, batch: list[ScheduledRequest], items: list[ForwardItem] | StepInputs,
                        aux: torch.Tensor, slots: torch.Tensor) -> None:
        """After a target pass over items (batch's, in order): store the features of every row, then write
        the rows that have waited long enough, of every request: those that do not speculate too, since their
        blocks may reach the prefix cache and a request that speculates trusts the head's rows there."""
        inputs = as_inputs(items)
        self.runner.store(slots, aux)
        ready = []
        ends = (inputs.starts + inputs.query_lens).tolist()
        for i, s in enumerate(batch):
            request = s.request
            held = self._held_rows(request, int(inputs.starts[i]))
            count = min(ends[i], request.num_tokens - 1) - held
            if count >= self.fill_at:
                table = inputs.block_tables[i, :inputs.num_blocks[i]].tolist()
                ready.append(ForwardItem(request.all_token_ids[held + 1:held + 1 + count], held, table, 0))
                held += count
            self._held[request] = (held, request.num_preemptions)
        if ready:
            self.runner.fill(sorted(ready, key=lambda it: len(it.token_ids) != 1))

    @torch.no_grad()
    def propose(self, spec: list[ScheduledRequest], pool: BlockPool) -> Proposal:
        """Draft s.num_spec_slots tokens for each s, on the device (Proposal.device_drafts, row r for
        spec[r]); q where some request drafts by sampling. s.draft_token_ids gets placeholders."""
        ks = [s.num_spec_slots for s in spec]
        depth = max(ks)
        tables = [pool.block_table(s.request.request_id) for s in spec]
        first = [self._catch_up(s.request, table) for s, table in zip(spec, tables)]
        for s, k in zip(spec, ks):
            s.draft_token_ids = [0] * k
        batch = self._sampling(spec, range(len(spec)))
        if batch is None and min(ks) == depth:
            # Greedy at one depth for all: the whole proposal is one chain, a graph replay where one holds it.
            drafted = self.runner.greedy_proposal(first, depth - 1)
            return Proposal(drafted if drafted is not None else self.runner.chain(first, depth - 1))
        return Proposal(*self._passes(spec, ks, tables, first, batch))

    @torch.no_grad()
    def propose_in_loop(self, spec: list[ScheduledRequest], previous, pool: BlockPool, k: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """A greedy proposal of k drafts a request (each s.num_spec_slots == k) for a step launched while
        `previous` (a StepInFlight or DraftStepInFlight of the loop, or None) is in flight, the host not knowing
        its tokens: a request in it catches up over the rows its tokens fill (previous.device_outputs(), as many as
        it had places for), of which those it did not accept are dropped on the device (HeadRunner.chain_after).
        Returns (drafts [R, k], drafts found [R]: k each).

        The head's rows counted as written stop before the step in flight's: the host does not know how many of
        them were real. The next proposal knows, where its step in flight is the one launched with this proposal
        (launched()): by then the host holds the tokens this proposal caught up over, and its rows end there."""
        rows = previous.rows if previous is not None else {}
        chained = self._launched[1] if self._launched is not None and self._launched[0] is previous else ()
        tokens, counts = previous.device_outputs() if previous is not None else (None, None)
        if tokens is None:
            tokens = torch.zeros(1, 1, dtype=torch.long, device=self.device)  # read by no row
        if counts is None:  # a step without drafts: one token a row
            counts = torch.ones(tokens.shape[0], dtype=torch.long, device=self.device)
        room = getattr(previous, "num_spec", None)  # drafts each row of the step in flight had places for
        items, where, widths = [], [], []
        for s in spec:
            request, table = s.request, pool.block_table(s.request.request_id)
            row = rows.get(request, -1)
            if row < 0:  # every token on the host
                items.append(self._catch_up(request, table))
                where.append(len(counts))  # the zero appended below
                widths.append(0)
                continue
            last = request.num_tokens - 1  # the step in flight's first position
            held = last if request in chained else self._held_rows(request, last)
            width = 1 + (room[row] if room is not None else 0)
            items.append(ForwardItem(request.all_token_ids[held + 1:last + 1] + [0] * width, held, table, 1, row,
                                     width))
            self._held[request] = (last, request.num_preemptions)
            where.append(row)
            widths.append(width)
        where, widths = to_device(np.array(where + widths, dtype=np.int64), torch.long, self.device).split(len(spec))
        back = widths - torch.cat([counts.long(), counts.new_zeros(1, dtype=torch.long)])[where]
        drafts = self.runner.chain_after(items, tokens, back, k - 1)
        self._launched = (None, {s.request for s in spec})
        return drafts, torch.full((len(spec),), k, dtype=torch.long, device=self.device)

    def launched(self, step) -> None:
        """The step the last propose_in_loop() drafted for was launched as `step`."""
        if self._launched is not None:
            self._launched = (step, self._launched[1])

    def _passes(self, spec: list[ScheduledRequest], ks: list[int], tables: list[list[int]], first: list[ForwardItem],
                batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Drafts [R, depth] and q pass by pass, where requests sample or draft to different depths. The first
        pass: every row still waiting, decodes (one row) first as packing wants. Pass j >= 1 reads draft j and
        the head's own output of the pass before, at row num_tokens - 2 + j, for the requests drafting more than
        j tokens. Every pass's inputs go to the device before the first runs, so no copy waits for a pass."""
        depth, device = max(ks), self.device
        order = sorted(range(len(spec)), key=lambda r: len(first[r].token_ids) != 1)
        rows, passes = [list(range(len(spec)))], [self.runner.prepare([first[r] for r in order])]
        for j in range(1, depth):
            rows.append([r for r in rows[-1] if ks[r] > j])
            passes.append(self.runner.prepare([ForwardItem([0], spec[r].request.num_tokens - 2 + j, tables[r], 1)
                                               for r in rows[-1]]))
        unsort = None if order == sorted(order) else to_device(np.argsort(order).tolist(), torch.long, device)
        where = [None if len(active) == len(spec) else to_device(active, torch.long, device) for active in rows]
        keep = [None] + [None if len(now) == len(before) else to_device([before.index(r) for r in now], torch.long,
                                                                        device) for before, now in zip(rows, rows[1:])]
        q = None if batch is None else torch.zeros(len(spec), depth, self.vocab_size, device=device)
        drafted = torch.zeros(len(spec), depth, dtype=torch.long, device=device)
        tokens = None
        for j, prepared in enumerate(passes):
            if j == 0:
                hidden = self.runner.run(prepared)
                hidden = hidden if unsort is None else hidden[unsort]
            else:
                if keep[j] is not None:
                    tokens, hidden = tokens[keep[j]], hidden[keep[j]]
                    batch = self._sampling(spec, rows[j])
                hidden = self.runner.run(prepared, hidden, tokens)
            tokens = self._pick(hidden, batch, q, where[j], j)
            drafted[slice(None) if where[j] is None else where[j], j] = tokens
        return drafted, q

    def _pick(self, hidden, batch, q, where: torch.Tensor | None, j: int) -> torch.Tensor:
        """Draft j of the rows `where` (None: all) from the head's output hidden states."""
        logits = self.head.logits(hidden, self.runner.ops).float()
        if batch is None:
            return self.head.token_ids(logits.argmax(dim=-1))
        probs = self.sampler.compute_probs(self.head.full_vocab_logits(logits), batch)
        q[slice(None) if where is None else where, j] = probs
        return self.sampler.sample_probs(probs, batch)

    def _sampling(self, spec: list[ScheduledRequest], rows):
        return draft_rows([spec[r].request for r in rows], self.vocab_size, self.device)

    def _held_rows(self, request: Request, start: int) -> int:
        """Rows of request the head has written, never past `start` (the target's computed tokens). A request
        seen first (or again after a preemption) starts fill_at rows before start: the rows before start come
        from the prefix cache, where the head's rows may lag the target's by up to fill_at (observe_forward
        writes them in batches, a proposal catches up the rest), so those are written again from the features
        stored there, which never lag."""
        if request in self._held:
            held, preemptions = self._held[request]
            if preemptions == request.num_preemptions:
                return min(held, start)
        return max(0, start - self.fill_at)

    def _catch_up(self, request: Request, table: list[int]) -> ForwardItem:
        """Rows [held, num_tokens - 1): feature t and token t + 1 each (at least the last); the last one's
        output drafts. Rows [0, num_tokens - 1) are then written."""
        last = request.num_tokens - 1
        start = min(self._held_rows(request, request.num_computed_tokens), last - 1)
        self._held[request] = (last, request.num_preemptions)
        return ForwardItem(request.all_token_ids[start + 1:last + 1], start, table, 1)
