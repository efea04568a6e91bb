"""The step loop: schedule, run the model once over the mixed batch, sample, update, stream out.

Overlapped (config.overlap_scheduling, on by default): a step is launched before the host has
read the tokens of the one before, which its inputs take from the device; the host then checks
those tokens for stops, detokenizes and streams them while the device runs the new step. Steps
that need the host to know every token first run the synchronous way (StepExecutor.can_defer).

`add_request` and `abort` are safe to call from any thread; they take effect at the start of
the next `step()`, which a single thread (the server's engine thread, or `LLM`) drives.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import replace

import numpy as np
import torch

from scheduler.config import EngineConfig
from scheduler.core.kv_cache import BlockPool
from scheduler.core.outputs import RequestOutput, RequestStream, StepStats
from scheduler.core.params import SamplingParams
from scheduler.core.request import FinishReason, Request
from scheduler.core.scheduler import PlainTokens, Scheduler, StepResult, columns
from scheduler.device_defaults import resolve_engine_config
from scheduler.io.detokenizer import IncrementalDetokenizer
from scheduler.io.inputs import InputProcessor, Prompt, eos_token_ids
from scheduler.io.token_bytes import TokenBytes
from scheduler.loop.admission import Admission, Live
from scheduler.loop.collector import tune_gc
from scheduler.loop.executor import StepExecutor, StepInFlight, Verification
from scheduler.loop.reports import (
    check_new_tokens,
    delta_output,
    failed_output,
    final_output,
    plain_checks,
    plain_deltas,
    step_stats,
)
from scheduler.sampling.sampler import Sampler
from scheduler.speculative.proposer import ProposerContext
from scheduler.speculative.speculator import Speculator, build_proposer
from scheduler.structured.compiler import GrammarCompiler
from scheduler.worker.memory import measure_step_peak, plan_kv_cache
from scheduler.worker.ranks import LeaderRunner, Ranks, load_target
from scheduler.worker.runner import ModelRunner

log = logging.getLogger(__name__)



class Engine:
    def __init__(self, config: EngineConfig | None = None, *, serving: bool = False, **kwargs):
        """serving: the daemon drives this engine (unset step limits are chosen for streaming latency)."""
        config = config or EngineConfig(**kwargs)
        # Tensor parallelism: the other ranks start loading their shards while this process loads its own.
        self.ranks = Ranks(config) if config.tensor_parallel_size > 1 else None
        try:
            self._build(config, serving)
        except BaseException:
            self.shutdown()
            raise

    def _build(self, config: EngineConfig, serving: bool) -> None:
        self.device = config.torch_device()
        self.dtype = config.torch_dtype(self.device)
        target = load_target(config, self.dtype, self.device, self.ranks)
        # Everything below reads the step limits as plain ints: the config's own, else the device's.
        self.config = config = resolve_engine_config(config, self.device, target.model, serving)
        self.model_config, self.tokenizer, self.model = target.config, target.tokenizer, target.model
        self.sampler = Sampler()
        proposer = build_proposer(ProposerContext(config, target, self.sampler, self.dtype, self.device))
        max_positions = target.max_positions
        if proposer is not None and proposer.max_positions is not None:
            max_positions = min(max_positions, proposer.max_positions)
        configs = [target.config] + ([proposer.kv_model_config] if proposer and proposer.kv_model_config else [])
        # Measured where this process can run a step alone (not under tensor parallelism: every rank takes part).
        step_peak = measure_step_peak(target.model, config, self.dtype, self.device, max_positions) \
            if self.device.type == "cuda" and config.kv_cache_bytes is None and self.ranks is None else None
        plan = plan_kv_cache(config, configs, self.dtype, self.device, step_peak)
        self.max_model_len = min(max_positions, plan.num_blocks * config.block_size)
        if self.max_model_len < target.max_positions:
            log.warning("max_model_len lowered to %d tokens, what the KV cache (and draft) hold", self.max_model_len)
        log.info("KV cache: %d blocks x %d tokens = %d tokens (%.1f MiB)", plan.num_blocks, config.block_size,
                 plan.num_blocks * config.block_size, plan.num_bytes / 2**20)
        self.pool = BlockPool(plan.num_blocks, config.block_size, config.enable_prefix_caching)
        self.runner = ModelRunner(self.model, plan.num_blocks, config.block_size, self.dtype, self.device) \
            if self.ranks is None else LeaderRunner(self.ranks, self.model, plan.num_blocks, config.block_size,
                                                    self.dtype, self.device)
        self.scheduler = Scheduler(self.pool, config.max_num_batched_tokens, config.max_num_seqs,
                                   config.priority_aging_s)
        self.speculator = None
        if proposer is not None:
            proposer.prepare(plan.num_blocks, self.max_model_len)
            self.speculator = Speculator.for_config(config, proposer, self.sampler)
        if self.runner.fused and not config.enforce_eager:
            self.runner.capture_graphs(config.max_num_seqs, config.max_query_len, self.max_model_len,
                                       max_batched_tokens=config.max_num_batched_tokens)
        self.executor = StepExecutor(self.runner, self.sampler, self.scheduler, self.speculator)
        if config.overlap_scheduling and config.speculation_in_loop and self.ranks is None:
            self.executor.speculate_in_loop(config.max_num_seqs, self.max_model_len)
        torch.manual_seed(config.seed)
        self.vocab_size = target.config.vocab_size
        self.eos_token_ids = eos_token_ids(target.config, self.tokenizer)
        self._eos = np.array(sorted(self.eos_token_ids), dtype=np.int64)
        self.inputs = InputProcessor(self.tokenizer, self.vocab_size, self.max_model_len)
        # Read ahead when serving: the first answer cut inside a character then waits for nothing.
        self.token_bytes = TokenBytes(self.tokenizer, prefetch=serving) if self.tokenizer is not None else None
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids) \
            if self.tokenizer is not None else None
        # A sequence's id is the engine's (the pool, the scheduler and _live key by it), a request's its client's:
        # no client string ever becomes a sequence id, so no request id can reach another request's state.
        self._live: dict[str, Live] = {}  # by each sequence's own id
        self._groups: dict[str, list[Live]] = {}  # a request's unfinished completions, by the request's id
        self._sequence_ids = itertools.count()
        self.admission = Admission(self.scheduler, self.pool)
        self._pending_add: list[list[Live]] = []
        self._pending_ids: dict[str, list[Live]] = {}  # _pending_add's groups by request id: no scan per add
        self._pending_abort: list[Request] = []  # the request objects: ids may be reused later
        self._failed: str | None = None
        self._in_flight: StepInFlight | Verification | None = None  # the step launched last, not collected yet
        self.num_overlapped_steps = 0
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.last_step_stats = StepStats(kv_blocks_free=self.pool.num_free_blocks, kv_blocks_total=plan.num_blocks)
        tune_gc(config.max_num_seqs)

    @property
    def kv_capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.pool.block_size

    def add_request(self, prompt: Prompt | None, params: SamplingParams | None = None, *, request_id: str | None = None,
                    priority: int = 0, prompt_token_ids: list[int] | None = None, speculative: bool | None = None,
                    max_draft_tokens: int | None = None, on_output=None, deltas: bool = True,
                    detokenize: bool = True) -> RequestStream:
        """Validate and queue a request. Raises ValueError naming the bad field. speculative and max_draft_tokens
        turn speculation off for this request or cap its depth. deltas=False: the stream is told once, at the end
        (no output built between); detokenize=False: token ids only, no text (but to match stop strings)."""
        params = params or SamplingParams()
        token_ids = prompt_token_ids if prompt_token_ids is not None else self.inputs.tokenize(prompt)
        token_ids = self.inputs.prepare(token_ids, params)
        if not isinstance(priority, int):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        max_total = self.max_model_len if params.max_tokens is None else len(token_ids) + params.max_tokens
        if max_draft_tokens is not None and (not isinstance(max_draft_tokens, int) or max_draft_tokens < 0):
            raise ValueError(f"max_draft_tokens must be an integer >= 0, got {max_draft_tokens!r}")
        stream = RequestStream(request_id, on_output, params.n)
        grammar = self.compile_grammar(params, check=True)  # compiled once, each completion matching it on its own
        lives = []
        for index in range(params.n):
            # Completion i of n is a sequence of its own, with its own random stream (seed + i when seeded).
            # The prompt's logprobs are the same for all: the first completion reports them.
            own = params if params.n == 1 else replace(
                params, n=1, seed=None if params.seed is None else params.seed + index,
                prompt_logprobs=params.prompt_logprobs if index == 0 else None)
            request = Request(f"seq-{next(self._sequence_ids)}", list(token_ids), own,
                              self.eos_token_ids, priority, max_total_tokens=max_total,
                              speculative=speculative is not False, max_draft_tokens=max_draft_tokens,
                              output_id=request_id, index=index, stream=stream)
            if own.seed is not None and not own.greedy:
                request.generator = torch.Generator(device=self.device).manual_seed(own.seed)
            detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, own, self.token_bytes) \
                if self.tokenizer is not None and (detokenize or own.stop) else None
            live = Live(request, stream, detokenizer, grammar, deltas)
            # Each new token takes the full stop check where a cheaper one may miss something (engine._settle).
            request.host_checks = not live.plain or bool(own.stop_token_ids) or request.prompt_logprobs is not None
            request.stream_deltas, request.handle = deltas, live
            lives.append(live)
        with self._lock:
            if self._failed is not None:
                raise RuntimeError(f"the engine has failed: {self._failed}")
            if request_id in self._groups or request_id in self._pending_ids:
                raise ValueError(f"request_id: {request_id!r} is already in use by a request in flight")
            self._pending_add.append(lives)
            self._pending_ids[request_id] = lives
        return stream

    def compile_grammar(self, params: SamplingParams, check: bool = False) -> Future | None:
        """Compile a structured request's grammar in the background (None when it has none): the daemon awaits it
        before add_request, which then finds it compiled. check: a bad grammar is a ValueError naming the field
        now (GrammarCompiler.check)."""
        so = params.structured_outputs
        if so is None:
            return None
        if self.grammars is None:
            raise ValueError(f"structured_outputs.{so.kind}: needs a tokenizer; this model has none")
        if check:
            self.grammars.check(so)
        return self.grammars.submit(so)

    def abort(self, request_id: str) -> bool:
        """End a request early (finish_reason "abort"); its KV blocks are freed at the next step.
        Returns whether a live request had that id; a later request reusing the id is unaffected."""
        with self._lock:
            group = self._groups.get(request_id) or self._pending_ids.get(request_id)
            if group is not None:
                self._pending_abort += [live.request for live in group]  # all n completions end
            return group is not None

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._live or self._pending_add)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + sum(len(g) for g in self._pending_add + self.admission.compiling)

    @property
    def num_waiting_prompt_tokens(self) -> int:
        """Prompt tokens of the requests not started yet: the queued work a load-aware router weighs."""
        with self._lock:
            pending = [live.request for group in self._pending_add + self.admission.compiling for live in group]
        return sum(r.num_prompt_tokens for r in [*list(self.scheduler.waiting), *pending]
                   if r.num_computed_tokens == 0)

    def step(self) -> list[RequestOutput]:
        """One engine iteration. Returns the outputs it also put on the request streams."""
        start = time.perf_counter()
        queried, hits = self.pool.prefix_queried_tokens, self.pool.prefix_hit_tokens
        outputs = self._take_pending()
        outputs += self._admit_compiled()
        # A step with drafts must be verified before the next is scheduled, and drafts are made from the host's
        # token history: such tokens come to the host now, their stop checks wait for this step's launch.
        # Drafts the device proposes and verifies (executor.loop) need none of this. A verification in flight
        # comes first, before the depth is planned: its requests count as decodes only once it is applied.
        # Each step's tokens, on their requests, not checked for stops yet: StepResults, or PlainTokens.
        collected = [self._collect()] if isinstance(self._in_flight, Verification) else []
        spec_depth = self._plan_depth() if self.speculator else 0
        if self._in_flight is not None and spec_depth and self.executor.loop is None:
            collected.append(self._collect())
        sched = self.scheduler.schedule(spec_depth)
        batch = sched.scheduled
        defer = self.config.overlap_scheduling and bool(batch) and self.executor.can_defer(batch)
        settled = 0
        if not defer:  # this step needs every token on the host, those in flight too: checked before it runs
            collected.append(self._collect())
            for results in collected:
                self._settle(results, outputs)
            settled = len(collected)
            if self.scheduler.progress.finished[columns(batch, self.scheduler.progress)[0]].any():
                batch = [s for s in batch if not s.request.is_finished]  # scheduled, then ended by a token in flight
        num_prompt_tokens = self.scheduler.num_prompt_tokens(batch)
        if defer:
            launched = self.executor.launch(batch, self._in_flight)
            collected.append(self._collect())  # the step before's tokens, while the device runs this one
            self._in_flight = launched
            self.num_overlapped_steps += 1
        elif batch:
            collected.append(self.executor.execute(batch))
        elif self.admission.compiling:
            self.admission.wait_for_grammar(timeout=0.01)
        for results in collected[settled:]:
            self._settle(results, outputs)
        self.admission.release_forks(self._live)
        self.last_step_stats = step_stats(self.scheduler, sched, collected, num_prompt_tokens, queried, hits, start,
                                          self.speculator is not None)
        self.executor.observe_step(batch, num_prompt_tokens > 0, time.perf_counter() - start, overlapped=defer)
        for live, output in outputs:  # _deliver, inline: most steps deliver an output a row
            try:
                live.stream.put(output)
            except Exception as exc:  # noqa: BLE001 - one request's reader failing ends that request only
                self._undelivered(live, output, exc)
            if output.finished:
                self._forget(live)
        self.executor.finish_draw(self._in_flight)  # its grammar masks were filled meanwhile
        return [output for _, output in outputs]

    def _undelivered(self, live: Live, output: RequestOutput, exc: Exception) -> None:
        log.error("request %s: its output could not be delivered (%r); aborting it", live.request.output_id, exc)
        with self._lock:
            self._pending_abort += [] if output.finished else [live.request]

    def _collect(self) -> list[StepResult] | PlainTokens:
        """The tokens of the step in flight, if any, on their requests; not checked for stops yet."""
        step, self._in_flight = self._in_flight, None
        return self.executor.collect(step) if step is not None else []

    def _settle(self, results: list[StepResult] | PlainTokens, outputs: list[tuple[Live, RequestOutput]]) -> None:
        """Check new tokens for stops, their outputs onto `outputs`. A request whose host work raises ends with
        the error (its blocks freed); the step and the other requests go on. Of PlainTokens, only the rows whose
        token may end them take the checks below; the others' outputs are built at once (plain_deltas)."""
        now, lives = time.monotonic(), self._live
        if isinstance(results, PlainTokens):
            results, quiet = plain_checks(results, self.scheduler.progress, self._eos)
            plain_deltas(lives, quiet, self.scheduler.progress, outputs)
        for result in results:
            request = result.request
            live = lives[request.request_id]
            try:
                if live.plain and len(result.new_token_ids) == 1 and request.first_token_time is not None \
                        and result.new_token_ids[0] not in request.ending_token_ids \
                        and len(request.all_token_ids) < request.max_total_tokens:
                    reason = None  # none of check_stop's cases; no text, grammar or logprob to follow
                else:
                    reason = check_new_tokens(live, result, now)
                if reason is not None:
                    outputs.append((live, self._finish(live, reason)))
                elif live.deltas:  # else the stream is told at the end only
                    outputs.append((live, delta_output(live)))
            except Exception as exc:  # noqa: BLE001 - isolated to the request it came from
                outputs.append((live, self._fail(live, exc)))

    def _fail(self, live: Live, exc: BaseException) -> RequestOutput:
        """End one request because its own processing raised: its blocks freed, its stream told why."""
        request, request.finish_reason = live.request, FinishReason.ABORT
        log.error("request %s failed in the engine: %r", request.output_id, exc)
        self.scheduler.finish(request)  # again if it had finished: its blocks are gone, it leaves no list twice
        return failed_output(request, f"request failed: {exc!r}")

    def _forget(self, live: Live) -> None:
        request = live.request
        request.handle = None  # the request and its Live no longer hold each other: no cycle left to the collector
        del self._live[request.request_id]
        group = self._groups[request.output_id]
        group.remove(live)
        if not group:
            del self._groups[request.output_id]

    def _plan_depth(self) -> int:
        """Draft tokens a decoding sequence may verify next step, from the decodes and prompt chunks it is likely
        to carry (a waiting or part-prefilled request)."""
        num_decodes, prompts = self.scheduler.num_decodes_ahead()
        return self.executor.plan(num_decodes, prompts or bool(self.scheduler.waiting))

    def fault(self) -> str | None:
        """Why the engine cannot step any more though no step has failed yet (a tensor-parallel rank gone)."""
        return self.ranks.fault() if self.ranks is not None else None

    def shutdown(self) -> None:
        """Stop the engine's threads (grammar compiles, token masks: each ends the work under way) and worker
        processes (tensor parallelism), also after a build that failed part-way; the engine is not stepped again."""
        for helper in (getattr(self, "grammars", None), getattr(getattr(self, "executor", None), "masks", None)):
            if helper is not None:
                helper.shutdown()
        if self.ranks is not None:
            self.ranks.close()

    def fail_all(self, error: str) -> None:
        """After a fault: end every request with `error` set. The engine is not stepped again."""
        with self._lock:
            self._failed = error
            self._in_flight = None
            lives = list(self._live.values()) + [live for group in self._pending_add for live in group]
            self._pending_add, self._pending_ids = [], {}
        self._live.clear()
        self._groups.clear()
        self.admission.clear()
        for live in lives:
            live.request.handle = None
            live.stream.put(failed_output(live.request, error))

    def _take_pending(self) -> list[tuple[Live, RequestOutput]]:
        with self._lock:  # abort() must find each request in _pending_add or _groups, never in between
            added, self._pending_add, self._pending_ids = self._pending_add, [], {}
            for group in added:
                self._groups[group[0].request.output_id] = list(group)
                for live in group:
                    self._live[live.request.request_id] = live
            aborted, self._pending_abort = self._pending_abort, []
        for group in added:
            self.admission.add(group)
        outputs = []
        for request in aborted:
            if not request.is_finished:
                live = self._live[request.request_id]
                outputs.append((live, self._finish(live, FinishReason.ABORT)))
        return outputs

    def _admit_compiled(self) -> list[tuple[Live, RequestOutput]]:
        """Queue the structured requests whose grammars are ready; one whose grammar failed ends with the error."""
        outputs = []
        for group, error in self.admission.admit_compiled():
            for live in group:
                output = self._finish(live, FinishReason.ABORT)
                output.error = f"structured_outputs.{live.request.params.structured_outputs.kind}: {error}"
                outputs.append((live, output))
        return outputs

    def _finish(self, live: Live, reason: FinishReason) -> RequestOutput:
        live.request.finish_reason = reason
        self.scheduler.finish(live.request)
        return final_output(live)
