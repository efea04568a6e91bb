"""CUDA graphs for the model runner: captured at start-up for buckets of step shapes, replayed
with one host-to-device copy of every input per step.

Steps where every sequence wants logits for all its new tokens (decodes, verification of drafts,
draft-model passes) replay a graph for a bucket of batch sizes: tokens are packed at the front of
fixed-size buffers, sequences past the real ones have no tokens, tokens past the real ones have
no KV slot and belong to no sequence, so they cost compute but touch nothing. Steps that carry
prompt chunks replay "mixed" graphs, bucketed by total tokens and sequences, whose attention grid
covers a query as long as the whole bucket (tiles past a sequence's own query exit at once). A
draft model's own graphs (chained passes, whole proposals) extend these, next to the draft
(scheduler/speculative/draft/graphs.py).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from scheduler.worker.attention import AttentionMetadata
from scheduler.worker.packing import ForwardItem, StepInputs, as_inputs, fill_block_tables, positions_and_slots
from scheduler.worker.shifts import apply_shifts

log = logging.getLogger(__name__)

GRAPH_MAX_CONTEXT = 8192  # longer sequences run eagerly: every replay uploads block tables this wide
# Batch-size buckets up to max_num_seqs (1024 by default on a big GPU): a batch pads to the next one, at most
# about a quarter more past 256.
GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896,
                     1024)
# Steps with prompt chunks replay graphs bucketed by their total tokens and (coarsely) their sequences.
MIXED_GRAPH_TOKENS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
MIXED_GRAPH_SEQS = (4, 16, 64, 256)


class CudaGraphs:
    """Captured graphs and the fixed buffers they read: one per (batch-size bucket, longest query)
    and per (sequences, tokens) bucket of steps with prompt chunks. Built from the model and its
    KV caches; the runner replays them.

    Every input lives in one int32 device buffer, filled from a pinned host mirror with one copy
    per step; block tables come last so a small batch copies only its own rows.
    """

    def __init__(self, model, kv_caches: list, block_size: int, max_num_seqs: int, max_query_len: int,
                 max_model_len: int, max_batched_tokens: int = 0):
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.max_query_len = max_query_len
        self.sizes = [b for b in GRAPH_BATCH_SIZES if b < max_num_seqs] + [max_num_seqs]
        max_seqs, self.width = self.sizes[-1], -(-min(max_model_len, GRAPH_MAX_CONTEXT) // block_size)
        self.mixed_tokens = [t for t in MIXED_GRAPH_TOKENS if t < max_batched_tokens]
        self.mixed_tokens += [max_batched_tokens] if max_batched_tokens else []
        self.mixed_seqs = [b for b in MIXED_GRAPH_SEQS if b < max_seqs] + [max_seqs]
        self.max_tokens = max_tokens = max(max_seqs * max_query_len, max_batched_tokens)
        sizes = {"input_ids": max_tokens, "positions": max_tokens, "slots": max_tokens,
                 "query_start_loc": max_seqs + 1, "seq_lens": max_seqs, "block_tables": max_seqs * self.width}
        self.offsets, total = {}, 0
        for name, size in sizes.items():
            self.offsets[name] = total
            total += size
        self.host = torch.zeros(total, dtype=torch.int32, pin_memory=True)
        self.host_np = self.host.numpy()
        self.device_buf = torch.zeros(total, dtype=torch.int32, device=kv_caches[0][0].device)
        self.copied = torch.cuda.Event()
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
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
        return self.model(self._view(buf, "input_ids", num_tokens), self._view(buf, "positions", num_tokens),
                          self.kv_caches, meta)

    def _capture_keys(self) -> list[tuple[dict, object, int, int]]:
        """(graph dict, static function, sequences, length) of every graph to capture, largest first."""
        keys = [(self.graphs, self._static_forward, b, q) for q in range(self.max_query_len, 0, -1)
                for b in reversed(self.sizes)]
        keys += self._extra_capture_keys()
        return keys + [(self.mixed, self._static_mixed, b, t) for t in reversed(self.mixed_tokens)
                       for b in reversed(self.mixed_seqs)]

    def _extra_capture_keys(self) -> list[tuple[dict, object, int, int]]:
        """(graph dict, static function, sequences, length) of further graphs a subclass captures."""
        return []

    def _extra_description(self) -> str:
        return ""

    @torch.inference_mode()
    def _capture(self) -> None:
        started, free_before = time.perf_counter(), torch.cuda.mem_get_info()[0]
        pool = torch.cuda.graph_pool_handle()
        self._fill([], self.max_tokens)  # every sequence empty, every token without a slot
        self._upload(self.sizes[-1])
        torch.cuda.synchronize()
        keys = self._capture_keys()
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
                 self.max_query_len, self._extra_description(),
                 f", steps with prompts of up to {self.mixed_tokens[-1]} tokens" if self.mixed_tokens else "",
                 time.perf_counter() - started, self.memory_bytes / 2**20)

    def fits(self, inputs: StepInputs) -> bool:
        if len(inputs) > self.sizes[-1]:
            return False
        lens = inputs.query_lens
        return bool((inputs.num_logits == lens).all() and (lens <= self.max_query_len).all()
                    and (inputs.num_blocks <= self.width).all())

    def mixed_bucket(self, inputs: StepInputs) -> tuple[int, int] | None:
        """The smallest (sequences, tokens) mixed graph that holds these sequences, if any."""
        num_tokens = int(inputs.query_lens.sum())
        seqs = next((b for b in self.mixed_seqs if b >= len(inputs)), None)
        tokens = next((t for t in self.mixed_tokens if t >= num_tokens), None)
        if seqs is None or tokens is None or bool((inputs.num_blocks > self.width).any()):
            return None
        return seqs, tokens

    def replay_mixed(self, items: StepInputs, bucket: tuple[int, int], patch=None, shifts=None) -> torch.Tensor:
        """Hidden states of every item's new tokens, in order; patch as from ModelRunner._patch, shifts from
        shifts.shift_plan."""
        self.num_mixed_replays += 1
        out, num_tokens = self._replay(self.mixed, bucket, items, bucket[1], None, patch, shifts)
        return out[:num_tokens]

    def replay(self, items: StepInputs, token_ids: torch.Tensor | None = None, patch=None,
               shifts=None) -> torch.Tensor:
        """Hidden states of every sequence's new tokens, in order; token_ids as in ModelRunner.forward,
        patch as from ModelRunner._patch, shifts from shifts.shift_plan."""
        num_seqs = self._batch_bucket(items)
        query_len = int(items.query_lens.max())
        out, num_tokens = self._replay(self.graphs, (num_seqs, query_len), items, num_seqs * query_len, token_ids,
                                      patch, shifts)
        return out[:num_tokens]

    def _batch_bucket(self, items: list[ForwardItem] | StepInputs) -> int:
        return next(b for b in self.sizes if b >= len(items))

    def _replay(self, graphs: dict, key: tuple[int, int], items: list[ForwardItem] | StepInputs, padded_tokens: int,
                token_ids: torch.Tensor | None, patch, shifts=None) -> tuple[torch.Tensor, int]:
        """Fill and upload the inputs, put the device-held tokens in, replay graphs[key] (its first
        number is its sequence bucket). Returns its output and the number of real tokens."""
        num_tokens = self._fill(items, padded_tokens)
        self._upload(key[0])
        if token_ids is not None:  # queued after the upload, so it overwrites the placeholders
            self._view(self.device_buf, "input_ids", num_tokens).copy_(token_ids, non_blocking=True)
        self._apply(patch)
        if shifts is not None:  # queued after the upload, like the patch
            buf = self.device_buf
            apply_shifts(shifts, self._view(buf, "positions", num_tokens), self._view(buf, "slots", num_tokens),
                         self._view(buf, "seq_lens", len(items)),
                         self._view(buf, "block_tables", self.sizes[-1] * self.width).view(-1, self.width),
                         self.block_size)
        graph, out = graphs[key]
        graph.replay()
        self.num_replays += 1
        self.slots = self._view(self.device_buf, "slots", num_tokens)  # the KV slots this replay wrote to
        return out, num_tokens

    def _apply(self, patch) -> None:
        """Device-held tokens into the uploaded input ids (queued after the upload)."""
        if patch is not None:
            ids = self._view(self.device_buf, "input_ids", self.max_tokens)
            ids.index_copy_(0, patch[0], patch[1].to(ids.dtype))

    def _fill(self, items: list[ForwardItem] | StepInputs, padded_tokens: int) -> int:
        host, bs = self.host_np, self.block_size
        self.copied.synchronize()  # the last step's copy has left the host buffer
        items = as_inputs(items)
        query_lens, starts = items.query_lens, items.starts
        num_tokens = int(query_lens.sum())
        qsl = self._view(host, "query_start_loc", self.sizes[-1] + 1)
        qsl[0] = 0
        np.cumsum(query_lens, out=qsl[1:len(items) + 1])
        qsl[len(items) + 1:] = num_tokens  # sequences past the real ones have no tokens
        seq_lens = self._view(host, "seq_lens", self.sizes[-1])
        seq_lens[:len(items)] = starts + query_lens
        seq_lens[len(items):] = 0
        tables = self._view(host, "block_tables", self.sizes[-1] * self.width).reshape(-1, self.width)
        fill_block_tables(tables, items)
        padded = max(padded_tokens, num_tokens)
        positions, slots = (self._view(host, name, padded) for name in ("positions", "slots"))
        positions[:num_tokens], slots[:num_tokens] = positions_and_slots(query_lens, qsl, starts, tables, bs)
        positions[num_tokens:], slots[num_tokens:] = 0, -1
        ids = self._view(host, "input_ids", padded)
        ids[:num_tokens] = items.token_ids
        ids[num_tokens:] = 0
        return num_tokens

    def _upload(self, num_seqs: int) -> None:
        end = self.offsets["block_tables"] + num_seqs * self.width
        self.device_buf[:end].copy_(self.host[:end], non_blocking=True)
        self.copied.record()
