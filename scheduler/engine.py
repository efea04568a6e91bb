"""The step loop: schedule, run the model once over the mixed batch, sample, update, stream out.

`add_request` and `abort` are safe to call from any thread; they take effect at the start of
the next `step()`, which a single thread (the server's engine thread, or `LLM`) drives.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time

import torch

from scheduler.config import EngineConfig
from scheduler.detokenizer import IncrementalDetokenizer
from scheduler.inputs import InputProcessor, Prompt
from scheduler.kv_cache import BlockPool
from scheduler.memory import plan_kv_cache
from scheduler.models import build_model, load_config, load_tokenizer, resolve_model
from scheduler.outputs import RequestMetrics, RequestOutput, RequestStream, StepStats, TokenLogprob
from scheduler.request import FinishReason, Request, SamplingParams
from scheduler.runner import ModelRunner
from scheduler.sampling import Sampler, SamplingBatch
from scheduler.scheduler import ScheduledRequest, Scheduler

log = logging.getLogger(__name__)


class _Live:
    """Engine-side companions of a request: its stream, detokenizer and RNG."""

    def __init__(self, request: Request, stream: RequestStream, detokenizer, generator):
        self.request = request
        self.stream = stream
        self.detokenizer = detokenizer
        self.generator = generator
        self.num_sent_tokens = 0
        self.logprobs: list[TokenLogprob] | None = [] if request.params.logprobs else None


class Engine:
    def __init__(self, config: EngineConfig | None = None, **kwargs):
        config = config or EngineConfig(**kwargs)
        self.config = config
        self.device = config.torch_device()
        self.dtype = config.torch_dtype(self.device)
        if isinstance(config.model, str):
            source = resolve_model(config.model)
            hf_config = load_config(source)
            self.tokenizer = load_tokenizer(config.tokenizer or source)
        else:
            source, hf_config = None, config.model
            self.tokenizer = load_tokenizer(config.tokenizer) if config.tokenizer else None
        self.model_config = hf_config
        max_positions = _model_context_length(hf_config, config.max_model_len)
        self.model = build_model(hf_config, source, config.load_format, self.dtype, self.device, max_positions)
        plan = plan_kv_cache(config, hf_config, self.dtype, self.device)
        self.max_model_len = min(max_positions, plan.num_blocks * config.block_size)
        if self.max_model_len < max_positions:
            log.warning("max_model_len lowered to %d tokens, what the KV cache holds", self.max_model_len)
        log.info("KV cache: %d blocks x %d tokens = %d tokens (%.1f MiB)", plan.num_blocks, config.block_size,
                 plan.num_blocks * config.block_size, plan.num_bytes / 2**20)
        self.pool = BlockPool(plan.num_blocks, config.block_size, config.enable_prefix_caching)
        self.runner = ModelRunner(self.model, plan.num_blocks, config.block_size, self.dtype, self.device)
        self.scheduler = Scheduler(self.pool, config.max_num_batched_tokens, config.max_num_seqs,
                                   config.priority_aging_s)
        self.sampler = Sampler()
        torch.manual_seed(config.seed)
        self.vocab_size = hf_config.vocab_size
        self.eos_token_ids = _eos_token_ids(hf_config, self.tokenizer)
        self.inputs = InputProcessor(self.tokenizer, self.vocab_size, self.max_model_len)
        self._live: dict[str, _Live] = {}
        self._pending_add: list[_Live] = []
        self._pending_abort: set[str] = set()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.last_step_stats = StepStats(kv_blocks_free=self.pool.num_free_blocks, kv_blocks_total=plan.num_blocks)

    @property
    def kv_capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.pool.block_size

    def add_request(self, prompt: Prompt | None, params: SamplingParams | None = None, *, request_id: str | None = None,
                    priority: int = 0, prompt_token_ids: list[int] | None = None,
                    on_output=None) -> RequestStream:
        """Validate and queue a request. Raises ValueError naming the bad field."""
        params = params or SamplingParams()
        token_ids = prompt_token_ids if prompt_token_ids is not None else self.inputs.tokenize(prompt)
        self.inputs.validate(token_ids, params)
        if not isinstance(priority, int):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        max_total = self.max_model_len if params.max_tokens is None else len(token_ids) + params.max_tokens
        request = Request(request_id, list(token_ids), params, self.eos_token_ids, priority,
                          max_total_tokens=max_total)
        detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, params) \
            if self.tokenizer is not None else None
        generator = None
        if params.seed is not None and not params.greedy:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        live = _Live(request, RequestStream(request_id, on_output), detokenizer, generator)
        with self._lock:
            if request_id in self._live or any(p.request.request_id == request_id for p in self._pending_add):
                raise ValueError(f"request_id {request_id!r} is already in use")
            self._pending_add.append(live)
        return live.stream

    def abort(self, request_id: str) -> None:
        """End a request early (finish_reason "abort"); its KV blocks are freed at the next step."""
        with self._lock:
            self._pending_abort.add(request_id)

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._live or self._pending_add)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + len(self._pending_add)

    def step(self) -> list[RequestOutput]:
        """One engine iteration. Returns the outputs it also put on the request streams."""
        start = time.perf_counter()
        queried, hits = self.pool.prefix_queried_tokens, self.pool.prefix_hit_tokens
        outputs = self._take_pending()
        sched = self.scheduler.schedule()
        batch = self.runner.order(sched.scheduled)
        num_prompt_tokens = sum(s.num_new_tokens for s in batch if s.request.num_computed_tokens
                                < s.request.num_prompt_tokens)
        num_sampled = sum(s.samples for s in batch)
        if batch:
            outputs += self._run(batch)
        self.last_step_stats = StepStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.pool.num_used_blocks / self.pool.num_blocks, kv_blocks_free=self.pool.num_free_blocks,
            kv_blocks_total=self.pool.num_blocks, num_batched_tokens=sched.num_batched_tokens,
            num_prompt_tokens=num_prompt_tokens, num_generation_tokens=num_sampled,
            num_preemptions=len(sched.preempted), prefix_cache_queries=self.pool.prefix_queried_tokens - queried,
            prefix_cache_hits=self.pool.prefix_hit_tokens - hits, step_s=time.perf_counter() - start)
        for output in outputs:
            self._live[output.request_id].stream.put(output)
            if output.finished:
                del self._live[output.request_id]
        return outputs

    def fail_all(self, error: str) -> None:
        """After a fault: end every request with `error` set. The engine is not stepped again."""
        with self._lock:
            lives = list(self._live.values()) + self._pending_add
            self._pending_add = []
        self._live.clear()
        for live in lives:
            live.stream.put(RequestOutput(live.request.request_id, [], "", finished=True, finish_reason="abort",
                                          error=error))

    def _take_pending(self) -> list[RequestOutput]:
        with self._lock:
            added, self._pending_add = self._pending_add, []
            aborted, self._pending_abort = self._pending_abort, set()
        for live in added:
            self._live[live.request.request_id] = live
            self.scheduler.add(live.request)
        outputs = []
        for request_id in aborted:
            live = self._live.get(request_id)
            if live is not None and not live.request.is_finished:
                outputs.append(self._finish(live, FinishReason.ABORT))
        return outputs

    def _run(self, batch: list[ScheduledRequest]) -> list[RequestOutput]:
        logits = self.runner.execute(batch, self.pool)
        sampling = [s.request for s in batch if s.samples]
        for s in batch:
            s.request.num_computed_tokens += s.num_new_tokens
            self.pool.cache_full_blocks(s.request, s.request.num_computed_tokens)
        if not sampling:
            return []
        lives = [self._live[r.request_id] for r in sampling]
        sampled = self.sampler(logits, SamplingBatch.build(
            [r.params for r in sampling], [r.prompt_token_ids for r in sampling],
            [r.output_token_ids for r in sampling], [lv.generator for lv in lives],
            [_blocked_ids(r) for r in sampling], self.vocab_size, self.device))
        token_ids = sampled.token_ids.tolist()
        logprobs = _logprob_lists(sampled) if sampled.logprobs is not None else None
        now = time.monotonic()
        outputs = []
        for row, live in enumerate(lives):
            token_logprob = logprobs[row] if logprobs and live.request.params.logprobs else None
            outputs.append(self._append(live, token_ids[row], token_logprob, now))
        return outputs

    def _append(self, live: _Live, token_id: int, logprob: TokenLogprob | None, now: float) -> RequestOutput:
        request = live.request
        request.append_token(token_id)
        if request.first_token_time is None:
            request.first_token_time = now
        if logprob is not None:
            logprob.top = logprob.top[:request.params.logprobs]
            live.logprobs.append(logprob)
        reason, stop_reason = _check_stop(request, token_id)
        if live.detokenizer is not None:
            stop_str = live.detokenizer.add_tokens([token_id], request.num_output_tokens)
            if stop_str is not None and reason != FinishReason.STOP:
                reason, stop_reason = FinishReason.STOP, stop_str
        if reason is not None:
            request.stop_reason = stop_reason
            return self._finish(live, reason)
        return self._delta(live)

    def _finish(self, live: _Live, reason: FinishReason) -> RequestOutput:
        request = live.request
        request.finish_reason = reason
        self.scheduler.finish(request)
        output = self._delta(live)
        output.finished, output.finish_reason, output.stop_reason = True, reason.value, request.stop_reason
        now = time.monotonic()
        start = request.arrival_time
        output.metrics = RequestMetrics(
            queue_s=(request.first_scheduled_time or now) - start, ttft_s=(request.first_token_time or now) - start,
            e2e_s=now - start, preemptions=request.num_preemptions)
        return output

    def _delta(self, live: _Live) -> RequestOutput:
        request = live.request
        new_ids = request.output_token_ids[live.num_sent_tokens:]
        new_logprobs = live.logprobs[live.num_sent_tokens:] if live.logprobs is not None else None
        live.num_sent_tokens = request.num_output_tokens
        text = live.detokenizer.take_delta(request.is_finished) if live.detokenizer is not None else ""
        return RequestOutput(request.request_id, new_ids, text, new_logprobs,
                             num_prompt_tokens=request.num_prompt_tokens, num_output_tokens=request.num_output_tokens,
                             num_cached_tokens=request.num_cached_tokens)


def _check_stop(request: Request, token_id: int) -> tuple[FinishReason | None, int | None]:
    params = request.params
    if request.num_output_tokens >= params.min_tokens:
        if not params.ignore_eos and token_id in request.eos_token_ids:
            return FinishReason.STOP, None
        if token_id in params.stop_token_ids:
            return FinishReason.STOP, token_id
    if request.num_tokens >= request.max_total_tokens:
        return FinishReason.LENGTH, None
    return None, None


def _blocked_ids(request: Request) -> list[int]:
    """Tokens that would end the request before min_tokens."""
    params = request.params
    if request.num_output_tokens >= params.min_tokens:
        return []
    return list(params.stop_token_ids) + ([] if params.ignore_eos else list(request.eos_token_ids))


def _logprob_lists(sampled) -> list[TokenLogprob]:
    chosen = sampled.logprobs.tolist()
    ids = sampled.token_ids.tolist()
    top_ids = sampled.top_token_ids.tolist() if sampled.top_token_ids is not None else [[] for _ in ids]
    top_vals = sampled.top_logprobs.tolist() if sampled.top_logprobs is not None else [[] for _ in ids]
    return [TokenLogprob(t, lp, list(zip(ti, tv))) for t, lp, ti, tv in zip(ids, chosen, top_ids, top_vals)]


def _model_context_length(config, max_model_len: int | None) -> int:
    limit = config.max_position_embeddings
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        limit = min(limit, window)  # within the window, full attention is exact
    if max_model_len is not None and max_model_len > limit:
        raise ValueError(f"max_model_len {max_model_len} exceeds the model's context length {limit}")
    return max_model_len or limit


def _eos_token_ids(config, tokenizer) -> tuple[int, ...]:
    ids = config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))
