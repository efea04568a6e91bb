"""Turns a scheduled step into tensors, runs the model over the paged KV cache, returns logits.

On CUDA the model runs through fused Triton kernels, and steps where every sequence wants
logits for all its new tokens (decodes, verification of drafts, draft-model passes) replay
a CUDA graph captured at start-up for a bucket of batch sizes: tokens are packed at the
front of fixed-size buffers, sequences past the real ones have no tokens, tokens past the
real ones have no KV slot and belong to no sequence, so they cost compute but touch nothing.
Steps that carry prompt chunks replay "mixed" graphs, bucketed by total tokens and sequences,
whose attention grid covers a query as long as the whole bucket (tiles past a sequence's
own query exit at once); logits are then taken for the rows that want them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from scheduler.attention import AttentionMetadata
from scheduler.models.llama import CausalLM
from scheduler.sampling import to_device

log = logging.getLogger(__name__)

GRAPH_MAX_CONTEXT = 8192  # longer sequences run eagerly: every replay uploads block tables this wide
GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
# Steps with prompt chunks replay graphs bucketed by their total tokens and (coarsely) their sequences.
MIXED_GRAPH_TOKENS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
MIXED_GRAPH_SEQS = (4, 16, 64, 256)


@dataclass
class ForwardItem:
    """One sequence's part of a forward pass."""

    token_ids: list[int]  # the new tokens to compute
    start: int  # position of the first of them: the tokens already in the cache
    block_table: list[int]
    num_logits: int  # logits wanted for this many trailing tokens (0 = none)
    # Its last num_device_tokens tokens are placeholders: the real ones are row device_row of the
    # device_tokens given to ModelRunner.forward (drafts the host has not seen yet).
    device_row: int = -1
    num_device_tokens: int = 0


def kv_bytes_per_block(config, block_size: int, dtype: torch.dtype) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim
    return per_token * block_size * torch.tensor([], dtype=dtype).element_size()


def fused_kernels_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        log.warning("triton is not installed: CUDA runs the reference attention, without CUDA graphs")
        return False
    return True


def _fill_block_tables(tables: np.ndarray, items: list[ForwardItem]) -> None:
    for row, it in enumerate(items):
        tables[row, :len(it.block_table)] = it.block_table


def _positions_and_slots(query_lens, query_start_loc, starts, block_tables, block_size: int):
    """Each new token's position in its sequence and its KV-cache slot, tokens laid end to end."""
    seq_of_token = np.repeat(np.arange(len(query_lens)), query_lens)
    positions = np.arange(query_start_loc[len(query_lens)]) - query_start_loc[seq_of_token] + starts[seq_of_token]
    slots = block_tables[seq_of_token, positions // block_size] * block_size + positions % block_size
    return positions, slots


def _device_token_patch(items: list[ForwardItem], row_width: int) -> np.ndarray | None:
    """[2, n]: where in the packed input ids each device-held token goes, and its index in the
    flattened device_tokens; None when no item has any."""
    dest, src, offset = [], [], 0
    for it in items:
        n = it.num_device_tokens
        if n:
            first = offset + len(it.token_ids) - n
            dest.extend(range(first, first + n))
            src.extend(range(it.device_row * row_width, it.device_row * row_width + n))
        offset += len(it.token_ids)
    return np.array([dest, src], dtype=np.int64) if dest else None


def _logits_indices(query_lens: np.ndarray, num_logits: np.ndarray) -> np.ndarray:
    """Rows of each sequence's last num_logits tokens, sequences laid end to end."""
    ends = np.cumsum(query_lens)
    return np.repeat(ends - num_logits, num_logits) + (
        np.arange(num_logits.sum()) - np.repeat(np.cumsum(num_logits) - num_logits, num_logits))


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device):
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (num_blocks, block_size, config.num_key_value_heads, head_dim)
        self.model = model
        self.block_size = block_size
        self.device = device
        def zeros():
            return torch.zeros(shape, dtype=dtype, device=device)

        self.kv_caches = [(zeros(), zeros()) for _ in range(config.num_hidden_layers)]
        self.fused = fused_kernels_available(device)
        if self.fused and model.fused_ops is None:
            model.use_fused_kernels()
        self.graphs: _Graphs | None = None

    def capture_graphs(self, max_num_seqs: int, max_query_len: int, max_model_len: int, max_chain: int = 0,
                       max_batched_tokens: int = 0) -> None:
        """CUDA graphs for steps of up to max_num_seqs sequences of up to max_query_len new tokens each
        (1 for decodes; 1 + k when verifying k drafts), in batch-size buckets; for steps with prompt
        chunks of up to max_batched_tokens tokens in all (0: none); and, for a draft model, greedy
        chains of 1..max_chain decode passes (see greedy_chain)."""
        assert self.fused, "CUDA graphs need the fused kernels"
        self.graphs = _Graphs(self, max_num_seqs, max_query_len, max_model_len, max_chain, max_batched_tokens)

    @torch.inference_mode()
    def greedy_chain(self, items: list[ForwardItem], token_ids: torch.Tensor, passes: int) -> torch.Tensor | None:
        """`passes` greedy decode passes in a row, each feeding its argmax tokens to the next, as one
        CUDA graph replay: the host prepares the first pass only (items of one placeholder token each,
        their tokens in token_ids on the device); pass j computes position start + j of every item.
        Returns the argmax tokens [passes, len(items)] on the device, or None where no graph holds
        these items (no graphs, too many sequences, too long, or a pass would leave its KV blocks)."""
        if self.graphs is None or len(items) > self.graphs.sizes[-1] or not 1 <= passes <= self.graphs.max_chain:
            return None
        bs = self.block_size
        if not all(len(it.token_ids) == it.num_logits == 1 and -(-(it.start + passes) // bs) <= len(it.block_table)
                   <= self.graphs.width for it in items):
            return None
        return self.graphs.replay_chain(items, token_ids, passes)

    @torch.inference_mode()
    def forward(self, items: list[ForwardItem], token_ids: torch.Tensor | None = None,
                device_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Compute the items' new tokens into the KV cache in one pass. Returns fp32 logits for
        each item's last `num_logits` tokens, items in the order given: [sum num_logits, vocab].

        Tokens the device holds and the host has not learnt yet, so the host never waits for them:
        token_ids, for items of one token each (a draft pass feeding on the last one's output),
        replaces every item's token; device_tokens [rows, width] fills the trailing placeholders of
        items that name a device_row (drafts to verify)."""
        assert token_ids is None or all(len(it.token_ids) == 1 for it in items)
        patch = None if device_tokens is None else self._patch(items, device_tokens)
        if self.graphs is not None and self.graphs.fits(items):
            return self.model.compute_logits(self.graphs.replay(items, token_ids, patch)).float()
        if self.graphs is not None and token_ids is None and (bucket := self.graphs.mixed_bucket(items)):
            hidden = self.graphs.replay_mixed(items, bucket, patch)
            rows = _logits_indices(np.fromiter((len(it.token_ids) for it in items), np.int64, len(items)),
                                   np.fromiter((it.num_logits for it in items), np.int64, len(items)))
            return self.model.compute_logits(hidden[self._to_device(rows)]).float()
        return self._forward_eager(items, token_ids, device_tokens)

    def _patch(self, items: list[ForwardItem], device_tokens: torch.Tensor):
        """(destinations in the packed input, tokens) for the items' device-held tokens, or None."""
        where = _device_token_patch(items, device_tokens.shape[1])
        if where is None:
            return None
        where = to_device(where, torch.long, self.device)
        return where[0], device_tokens.reshape(-1)[where[1]]

    @torch.inference_mode()
    def _forward_eager(self, items: list[ForwardItem], token_ids: torch.Tensor | None = None,
                       device_tokens: torch.Tensor | None = None) -> torch.Tensor:
        order = sorted(range(len(items)), key=lambda i: len(items[i].token_ids) != 1)  # decodes first
        input_ids, positions, meta, logits_indices = self._prepare([items[i] for i in order])
        if token_ids is not None:  # every item is a decode, so the order is the caller's
            input_ids = token_ids.to(input_ids.dtype)
        if device_tokens is not None and (patch := self._patch([items[i] for i in order], device_tokens)):
            input_ids.index_copy_(0, patch[0], patch[1].to(input_ids.dtype))
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        logits = self.model.compute_logits(hidden[logits_indices]).float()
        if order == sorted(order):
            return logits
        # Rows come out in the sorted order; hand them back in the caller's.
        row_starts = np.cumsum([0] + [items[i].num_logits for i in order])
        sorted_pos = {item: pos for pos, item in enumerate(order)}
        back = np.concatenate([np.arange(row_starts[sorted_pos[i]], row_starts[sorted_pos[i]] + items[i].num_logits)
                               for i in range(len(items))]).astype(np.int64)
        return logits[self._to_device(back)]

    def _prepare(self, items: list[ForwardItem]):
        bs = self.block_size
        query_lens = np.array([len(it.token_ids) for it in items], dtype=np.int64)
        starts = np.array([it.start for it in items], dtype=np.int64)
        seq_lens = starts + query_lens
        query_start_loc = np.concatenate(([0], np.cumsum(query_lens)))
        block_tables = np.zeros((len(items), max(len(it.block_table) for it in items)), dtype=np.int64)
        _fill_block_tables(block_tables, items)
        positions, slot_mapping = _positions_and_slots(query_lens, query_start_loc, starts, block_tables, bs)
        input_ids = np.fromiter((t for it in items for t in it.token_ids), dtype=np.int64,
                                count=int(query_start_loc[-1]))
        logits_indices = _logits_indices(query_lens, np.array([it.num_logits for it in items], dtype=np.int64))
        num_decodes = int((query_lens == 1).sum())  # all at the front
        non_decode_lens = query_lens[num_decodes:]
        to_dev = self._to_device
        meta = AttentionMetadata(
            slot_mapping=to_dev(slot_mapping), query_start_loc=to_dev(query_start_loc), seq_lens=to_dev(seq_lens),
            block_tables=to_dev(block_tables), num_decodes=num_decodes,
            max_query_len=int(non_decode_lens.max()) if len(non_decode_lens) else 1, max_seq_len=int(seq_lens.max()))
        return to_dev(input_ids), to_dev(positions), meta, to_dev(logits_indices)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, non_blocking=True)


class _Graphs:
    """Captured graphs, one per (batch-size bucket, longest query) and the fixed buffers they read.

    Every input lives in one int32 device buffer, filled from a pinned host mirror with one copy
    per step; block tables come last so a small batch copies only its own rows.
    """

    def __init__(self, runner: ModelRunner, max_num_seqs: int, max_query_len: int, max_model_len: int,
                 max_chain: int = 0, max_batched_tokens: int = 0):
        self.runner = runner
        self.max_query_len = max_query_len
        self.max_chain = max_chain
        self.sizes = [b for b in GRAPH_BATCH_SIZES if b < max_num_seqs] + [max_num_seqs]
        max_seqs, self.width = self.sizes[-1], -(-min(max_model_len, GRAPH_MAX_CONTEXT) // runner.block_size)
        self.mixed_tokens = [t for t in MIXED_GRAPH_TOKENS if t < max_batched_tokens]
        self.mixed_tokens += [max_batched_tokens] if max_batched_tokens else []
        self.mixed_seqs = [b for b in MIXED_GRAPH_SEQS if b < max_seqs] + [max_seqs]
        max_tokens = max(max_seqs * max_query_len, max_batched_tokens)
        sizes = {"input_ids": max_tokens, "positions": max_tokens, "slots": max_tokens,
                 "query_start_loc": max_seqs + 1, "seq_lens": max_seqs, "block_tables": max_seqs * self.width}
        self.max_tokens = max_tokens
        self.offsets, total = {}, 0
        for name, size in sizes.items():
            self.offsets[name] = total
            total += size
        self.host = torch.zeros(total, dtype=torch.int32, pin_memory=True)
        self.host_np = self.host.numpy()
        self.device_buf = torch.zeros(total, dtype=torch.int32, device=runner.device)
        self.copied = torch.cuda.Event()
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.chains: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # (seqs, passes)
        self.mixed: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # (seqs, tokens)
        self.num_replays = 0
        self.num_mixed_replays = 0  # of which steps with prompt chunks
        self._capture()

    def _view(self, buf, name: str, size: int):
        start = self.offsets[name]
        return buf[start:start + size]

    def _static_mixed(self, num_seqs: int, num_tokens: int) -> torch.Tensor:
        return self._static_forward(num_seqs, num_tokens, num_tokens)

    def _static_forward(self, num_seqs: int, query_len: int, num_tokens: int | None = None) -> torch.Tensor:
        """Every sequence holds at most query_len tokens, num_tokens (default num_seqs * query_len) in all."""
        num_tokens, buf = num_tokens or num_seqs * query_len, self.device_buf
        meta = AttentionMetadata(
            slot_mapping=self._view(buf, "slots", num_tokens),
            query_start_loc=self._view(buf, "query_start_loc", num_seqs + 1),
            seq_lens=self._view(buf, "seq_lens", num_seqs),
            block_tables=self._view(buf, "block_tables", num_seqs * self.width).view(num_seqs, self.width),
            num_decodes=num_seqs if query_len == 1 else 0, max_query_len=query_len, max_seq_len=0)
        return self.runner.model(self._view(buf, "input_ids", num_tokens), self._view(buf, "positions", num_tokens),
                                 self.runner.kv_caches, meta)

    def _static_chain(self, num_seqs: int, passes: int) -> torch.Tensor:
        """`passes` decode passes over the buffers' first pass; later passes derive their positions,
        KV slots and lengths on the device. Rows past the real ones have slot -1 and stay inert."""
        buf, bs, model = self.device_buf, self.runner.block_size, self.runner.model
        ids = self._view(buf, "input_ids", num_seqs)
        first_positions = self._view(buf, "positions", num_seqs)
        first_slots = self._view(buf, "slots", num_seqs)
        first_lens = self._view(buf, "seq_lens", num_seqs)
        tables = self._view(buf, "block_tables", num_seqs * self.width).view(num_seqs, self.width)
        real = first_slots >= 0
        out = []
        for j in range(passes):
            positions, slots, seq_lens = first_positions + j, first_slots, first_lens + j * real
            if j:
                blocks = tables.gather(1, (positions // bs).long().unsqueeze(1)).squeeze(1)
                slots = torch.where(real, blocks * bs + positions % bs, -1)
            meta = AttentionMetadata(
                slot_mapping=slots, query_start_loc=self._view(buf, "query_start_loc", num_seqs + 1),
                seq_lens=seq_lens, block_tables=tables, num_decodes=num_seqs, max_query_len=1, max_seq_len=0)
            ids = model.compute_logits(model(ids, positions, self.runner.kv_caches, meta)).argmax(dim=-1)
            out.append(ids)
        return torch.stack(out)

    @torch.inference_mode()
    def _capture(self) -> None:
        started, free_before = time.perf_counter(), torch.cuda.mem_get_info()[0]
        pool = torch.cuda.graph_pool_handle()
        query_lens = range(self.max_query_len, 0, -1)
        self._fill([], self.max_tokens)  # every sequence empty, every token without a slot
        self._upload(self.sizes[-1])
        torch.cuda.synchronize()
        keys = [(self.graphs, self._static_forward, b, q) for q in query_lens for b in reversed(self.sizes)]
        keys += [(self.chains, self._static_chain, b, n) for n in range(self.max_chain, 0, -1)
                 for b in reversed(self.sizes)]
        keys += [(self.mixed, self._static_mixed, b, t) for t in reversed(self.mixed_tokens)
                 for b in reversed(self.mixed_seqs)]
        for i, (graphs, forward, num_seqs, length) in enumerate(keys):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                forward(num_seqs, length)  # compiles kernels, warms cuBLAS
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = forward(num_seqs, length)
            graphs[(num_seqs, length)] = (graph, out)
            if (i + 1) % 8 == 0 or i + 1 == len(keys):
                log.info("captured CUDA graphs: %d/%d", i + 1, len(keys))
        torch.cuda.synchronize()
        self.memory_bytes = max(0, free_before - torch.cuda.mem_get_info()[0])
        log.info("CUDA graphs for up to %d sequences x 1-%d tokens%s%s: %.1f s, %.0f MiB", self.sizes[-1],
                 self.max_query_len, f", greedy chains of 1-{self.max_chain} passes" if self.max_chain else "",
                 f", steps with prompts of up to {self.mixed_tokens[-1]} tokens" if self.mixed_tokens else "",
                 time.perf_counter() - started, self.memory_bytes / 2**20)

    def fits(self, items: list[ForwardItem]) -> bool:
        if len(items) > self.sizes[-1]:
            return False
        return all(it.num_logits == len(it.token_ids) <= self.max_query_len and len(it.block_table) <= self.width
                   for it in items)

    def mixed_bucket(self, items: list[ForwardItem]) -> tuple[int, int] | None:
        """The smallest (sequences, tokens) mixed graph that holds these items, if any."""
        num_tokens = sum(len(it.token_ids) for it in items)
        seqs = next((b for b in self.mixed_seqs if b >= len(items)), None)
        tokens = next((t for t in self.mixed_tokens if t >= num_tokens), None)
        if seqs is None or tokens is None or any(len(it.block_table) > self.width for it in items):
            return None
        return seqs, tokens

    def replay_mixed(self, items: list[ForwardItem], bucket: tuple[int, int], patch=None) -> torch.Tensor:
        """Hidden states of every item's new tokens, in order; patch as from ModelRunner._patch."""
        num_seqs, num_tokens = bucket
        real_tokens = self._fill(items, num_tokens)
        self._upload(num_seqs)
        self._apply(patch)
        graph, out = self.mixed[bucket]
        graph.replay()
        self.num_replays += 1
        self.num_mixed_replays += 1
        return out[:real_tokens]

    def replay(self, items: list[ForwardItem], token_ids: torch.Tensor | None = None, patch=None) -> torch.Tensor:
        """Hidden states of every item's new tokens, in order; token_ids as in ModelRunner.forward,
        patch as from ModelRunner._patch."""
        query_len = max(len(it.token_ids) for it in items)
        out, num_tokens = self._replay(self.graphs, items, query_len, token_ids, patch)
        return out[:num_tokens]

    def replay_chain(self, items: list[ForwardItem], token_ids: torch.Tensor, passes: int) -> torch.Tensor:
        """Argmax tokens [passes, len(items)] of a greedy chain (see ModelRunner.greedy_chain)."""
        out, _ = self._replay(self.chains, items, passes, token_ids)
        return out[:, :len(items)]

    def _replay(self, graphs: dict, items: list[ForwardItem], length: int, token_ids: torch.Tensor | None,
                patch=None):
        num_seqs = next(b for b in self.sizes if b >= len(items))
        num_tokens = self._fill(items, num_seqs * (length if graphs is self.graphs else 1))
        self._upload(num_seqs)
        if token_ids is not None:  # queued after the upload, so it overwrites the placeholders
            self._view(self.device_buf, "input_ids", num_tokens).copy_(token_ids, non_blocking=True)
        self._apply(patch)
        graph, out = graphs[(num_seqs, length)]
        graph.replay()
        self.num_replays += 1
        return out, num_tokens

    def _apply(self, patch) -> None:
        """Device-held tokens into the uploaded input ids (queued after the upload)."""
        if patch is not None:
            ids = self._view(self.device_buf, "input_ids", self.max_tokens)
            ids.index_copy_(0, patch[0], patch[1].to(ids.dtype))

    def _fill(self, items: list[ForwardItem], padded_tokens: int) -> int:
        host, bs = self.host_np, self.runner.block_size
        self.copied.synchronize()  # the last step's copy has left the host buffer
        query_lens = np.fromiter((len(it.token_ids) for it in items), dtype=np.int64, count=len(items))
        starts = np.fromiter((it.start for it in items), dtype=np.int64, count=len(items))
        num_tokens = int(query_lens.sum())
        qsl = self._view(host, "query_start_loc", self.sizes[-1] + 1)
        qsl[0] = 0
        np.cumsum(query_lens, out=qsl[1:len(items) + 1])
        qsl[len(items) + 1:] = num_tokens  # sequences past the real ones have no tokens
        seq_lens = self._view(host, "seq_lens", self.sizes[-1])
        seq_lens[:len(items)] = starts + query_lens
        seq_lens[len(items):] = 0
        tables = self._view(host, "block_tables", self.sizes[-1] * self.width).reshape(-1, self.width)
        _fill_block_tables(tables, items)
        padded = max(padded_tokens, num_tokens)
        positions, slots = (self._view(host, name, padded) for name in ("positions", "slots"))
        positions[:num_tokens], slots[:num_tokens] = _positions_and_slots(query_lens, qsl, starts, tables, bs)
        positions[num_tokens:], slots[num_tokens:] = 0, -1
        ids = self._view(host, "input_ids", padded)
        ids[:num_tokens] = [t for it in items for t in it.token_ids]
        ids[num_tokens:] = 0
        return num_tokens

    def _upload(self, num_seqs: int) -> None:
        end = self.offsets["block_tables"] + num_seqs * self.width
        self.device_buf[:end].copy_(self.host[:end], non_blocking=True)
        self.copied.record()
