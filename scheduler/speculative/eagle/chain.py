"""The head's greedy proposal as one chain of passes: a catch-up pass over the rows each sequence still
waits for, then `passes` one-row passes, each reading the last one's output hidden state and argmax
token. Every pass after the first derives its positions, KV slots and lengths on the device from the
first's, so the host prepares one pass, the chain never waits for the device, and its shapes are fixed
by the first pass's: on CUDA it is captured as one graph per batch-size bucket (EagleGraphs) and
replayed; elsewhere the same function runs eagerly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scheduler.speculative.draft.graphs import DraftGraphs
from scheduler.speculative.eagle.head import EagleHead
from scheduler.worker.attention import AttentionMetadata


def greedy_chain(head: EagleHead, kv_cache: tuple, features: torch.Tensor, ops, input_ids: torch.Tensor,
                 positions: torch.Tensor, meta: AttentionMetadata, last_rows: torch.Tensor, passes: int,
                 block_size: int, back: torch.Tensor | None = None) -> torch.Tensor:
    """Argmax drafts [sequences, 1 + passes]. The first pass is meta's rows (row t: feature t from the
    feature cache, token t + 1); column 0 is read from each sequence's row last_rows. Pass j >= 1 reads
    column j - 1 and the hidden state it came from, at position seq_len + j - 1, where back [sequences] (on the
    device) takes that many of each sequence's last rows off its seq_len: rows the step in flight did not
    accept (HeadRunner.chain_after). Sequences with seq_len 0 (a graph's padding, after the real ones) and rows
    with slot -1 write nothing."""
    first_features = features[meta.slot_mapping.clamp(min=0)]
    hidden = head.forward_paged(input_ids, first_features, positions, kv_cache, meta, ops, last_rows)
    tokens = head.greedy_token_ids(hidden, ops)
    out = [tokens]
    caught_up, tables = meta.seq_lens if back is None else meta.seq_lens - back.to(meta.seq_lens.dtype), \
        meta.block_tables
    real = caught_up > 0
    one_each = F.pad(real.cumsum(0), (1, 0)).to(meta.query_start_loc.dtype)  # a row each, none for padding
    for j in range(passes):
        at = caught_up + j
        blocks = tables.gather(1, (at // block_size).long().unsqueeze(1)).squeeze(1)
        step = AttentionMetadata(
            slot_mapping=torch.where(real, blocks * block_size + at % block_size, -1), query_start_loc=one_each,
            seq_lens=(at + 1) * real, block_tables=tables, num_decodes=len(caught_up), max_query_len=1,
            max_seq_len=meta.max_seq_len + j + 1 if meta.max_seq_len else 0)
        hidden = head.forward_paged(tokens, hidden, at, kv_cache, step, ops)
        tokens = head.greedy_token_ids(hidden, ops)
        out.append(tokens)
    return torch.stack(out, dim=1)


class EagleGraphs(DraftGraphs):
    """Whole greedy proposals of the head (greedy_chain: a catch-up of up to max_query_len rows a sequence,
    then 0..max_chain passes) per batch-size bucket; nothing else of the runner's graphs."""

    def __init__(self, head: EagleHead, kv_caches: list, features: torch.Tensor, ops, block_size: int,
                 max_num_seqs: int, max_query_len: int, max_model_len: int, max_chain: int):
        self.features, self.ops = features, ops
        # Rows each sequence drops from its end (HeadRunner.chain_after); zero but during such a replay.
        self.back = torch.zeros(max_num_seqs, dtype=torch.long, device=kv_caches[0][0].device)
        super().__init__(head, kv_caches, block_size, max_num_seqs, max_query_len, max_model_len, 0, max_chain,
                         proposals=True)

    def _capture_keys(self) -> list:
        return [(self.proposals, self._static_proposal, b, n) for n in range(self.proposal_passes, -1, -1)
                for b in reversed(self.sizes)]

    def _extra_description(self) -> str:
        return f", EAGLE proposals of 1-{self.proposal_passes + 1} drafts"

    def replay_after(self, items, back: torch.Tensor, passes: int, patch) -> torch.Tensor:
        """HeadRunner.chain_after's drafts [len(items), 1 + passes]: a proposal replayed with the step in flight's
        tokens patched into its inputs (patch as from ModelRunner._patch) and back [len(items)] in its buffer."""
        num_seqs = self._batch_bucket(items)
        self.num_proposal_replays += 1
        self.back[:len(items)].copy_(back)
        out, _ = self._replay(self.proposals, (num_seqs, passes), items, num_seqs * self.max_query_len, None, patch)
        self.back.zero_()  # queued after the replay: the other proposals drop nothing
        return out[:len(items)]

    def _static_proposal(self, num_seqs: int, passes: int) -> torch.Tensor:
        buf, num_tokens = self.device_buf, num_seqs * self.max_query_len
        query_start_loc = self._view(buf, "query_start_loc", num_seqs + 1)
        meta = AttentionMetadata(
            slot_mapping=self._view(buf, "slots", num_tokens), query_start_loc=query_start_loc,
            seq_lens=self._view(buf, "seq_lens", num_seqs),
            block_tables=self._view(buf, "block_tables", num_seqs * self.width).view(num_seqs, self.width),
            num_decodes=0, max_query_len=self.max_query_len, max_seq_len=0)
        back = self.back[:num_seqs]
        last_rows = (query_start_loc[1:] - 1 - back).clamp(min=0).long()
        return greedy_chain(self.model, self.kv_caches[0], self.features, self.ops,
                            self._view(buf, "input_ids", num_tokens), self._view(buf, "positions", num_tokens), meta,
                            last_rows, passes, self.block_size, back)
