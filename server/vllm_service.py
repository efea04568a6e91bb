"""`vllm.grpc.engine.VllmEngine`, the worker protocol that gateways (smg, vllm-router, the Gateway API
Inference Extension) route to, on the same port as beastserve.v1.Generation and over the same engine.

The gateway tokenizes, applies the chat template and detokenizes itself: prompts arrive as token ids and
answers leave as token ids. It fetches the tokenizer from us (GetTokenizer), so it needs no model files."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import tempfile
import time
import uuid
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import grpc
from smg_grpc_proto.generated import common_pb2
from smg_grpc_proto.generated import vllm_engine_pb2 as vpb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc as vpb_grpc

from server.async_engine import EngineDeadError
from server.calls import EngineCalls, ServerState
from server.config import served_name
from server.convert import InvalidArgument
from server.vllm_convert import Responses, to_engine_inputs

SERVICE_NAME = vpb.DESCRIPTOR.services_by_name["VllmEngine"].full_name
SERVER_TYPE = "vllm-grpc"  # what gateways expect of a worker speaking this protocol
TOKENIZER_CHUNK_BYTES = 256 << 10


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"beastserve-{version('beastserve')}"
    except PackageNotFoundError:  # run from a plain checkout
        return "beastserve"


VERSION = _version()


class VllmEngineService(EngineCalls, vpb_grpc.VllmEngineServicer):
    def __init__(self, state: ServerState):
        super().__init__(state)
        self.started = time.time()
        self.last_receive = 0.0
        self._tokenizer_zip: bytes | None = None

    async def Generate(self, request, context):
        self.last_receive = time.time()
        engine = await self.engine(context, generation=True)
        try:
            token_ids, params, logprobs = await to_engine_inputs(request, engine.engine, self.state.edge)
        except InvalidArgument as exc:
            await self.fail(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        responses = Responses(request.stream, logprobs, token_ids)
        request_id = request.request_id or uuid.uuid4().hex
        # The gateway detokenizes itself: no text is made here (but to match stop strings).
        await self.stream(context, token_ids, params, request_id, responses.add, detokenize=False)

    async def Embed(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Embed: beastserve is a generation daemon; it serves "
                            "no embeddings")

    async def StartProfile(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "StartProfile: profiling is not served")

    async def StopProfile(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "StopProfile: profiling is not served")

    async def HealthCheck(self, request, context):
        healthy, message = self.ready()
        return vpb.HealthCheckResponse(healthy=healthy, message=message)

    async def Abort(self, request, context):
        (await self.engine(context)).abort(list(request.request_ids))
        return vpb.AbortResponse()

    async def FlushCache(self, request, context):
        engine = await self.engine(context)
        timeout = request.timeout_s or None
        try:
            freed = await asyncio.wait_for(engine.reset_prefix_cache(), timeout)
        except TimeoutError:
            return common_pb2.FlushCacheResponse(success=False, message=f"not flushed within {timeout} s")
        return common_pb2.FlushCacheResponse(success=True, message=f"{freed} cached blocks dropped")

    async def GetModelInfo(self, request, context):
        engine = (await self.engine(context)).engine
        config, model_config, tokenizer = self.state.config, engine.model_config, engine.tokenizer
        return vpb.GetModelInfoResponse(
            model_path=served_name(config), is_generation=True, max_context_length=engine.max_model_len,
            vocab_size=engine.vocab_size, supports_vision=False, served_model_name=served_name(config),
            tokenizer_path="", model_type=getattr(model_config, "model_type", ""),
            architectures=list(getattr(model_config, "architectures", None) or []),
            eos_token_ids=list(engine.eos_token_ids), pad_token_id=_token_id(model_config, tokenizer, "pad"),
            bos_token_id=_token_id(model_config, tokenizer, "bos"), max_req_input_len=engine.max_model_len - 1,
            default_sampling_params_json=json.dumps({}))

    async def GetServerInfo(self, request, context):
        engine = (await self.engine(context)).engine
        config = self.state.config.engine
        return vpb.GetServerInfoResponse(
            active_requests=len(self.state.in_flight), is_paused=False, last_receive_timestamp=self.last_receive,
            uptime_seconds=time.time() - self.started, server_type=SERVER_TYPE, data_parallel_size=1,
            kv_cache_dtype="auto", block_size=config.block_size, model_dtype=str(engine.dtype),
            max_num_seqs=engine.config.max_num_seqs)

    async def GetLoads(self, request, context):
        async_engine = await self.engine(context)
        engine, pool = async_engine.engine, async_engine.engine.pool
        queried = pool.prefix_queried_tokens
        load = vpb.SchedulerLoad(
            dp_rank=0, num_running_reqs=engine.num_running, num_waiting_reqs=engine.num_waiting,
            num_total_reqs=engine.num_running + engine.num_waiting,
            num_used_tokens=pool.num_used_blocks * pool.block_size, max_total_num_tokens=engine.kv_capacity_tokens,
            token_usage=pool.num_used_blocks / pool.num_blocks, gen_throughput=async_engine.generation_tokens_per_s(),
            cache_hit_rate=pool.prefix_hit_tokens / queried if queried else 0.0,
            utilization=engine.num_running / engine.config.max_num_seqs,
            max_running_requests=engine.config.max_num_seqs,
            num_waiting_uncached_tokens=engine.num_waiting_prompt_tokens)
        return vpb.GetLoadsResponse(timestamp=datetime.now(timezone.utc).isoformat(), version=VERSION,
                                    dp_rank_count=1, loads=[load])

    async def GetTokenizer(self, request, context):
        engine = (await self.engine(context)).engine
        if engine.tokenizer is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "GetTokenizer: this model has no tokenizer")
        if self._tokenizer_zip is None:
            self._tokenizer_zip = await asyncio.to_thread(tokenizer_zip, engine.tokenizer)
        data = self._tokenizer_zip
        digest = hashlib.sha256(data).hexdigest()
        starts = range(0, len(data), TOKENIZER_CHUNK_BYTES)
        for i, start in enumerate(starts):
            last = i == len(starts) - 1
            yield common_pb2.GetTokenizerChunk(data=data[start:start + TOKENIZER_CHUNK_BYTES],
                                               sha256=digest if last else "")

    async def SubscribeKvEvents(self, request, context):
        """The prefix cache's blocks as they are stored and evicted, so a cache-aware router knows exactly what this
        replica holds. Every subscription opens with the whole cache (cleared, then each cached block stored), so
        nothing from before it, or from a gap in an earlier subscription, is needed: its batches are numbered on
        from the subscriber's start_sequence_number."""
        engine = await self.engine(context)
        await context.send_initial_metadata(())  # the router waits for the stream to open before anything flows
        batches = KvEventBatches(request.start_sequence_number, self.state.config.engine.block_size)
        events = engine.follow_kv_cache()
        try:
            contents = await anext(events)
            yield batches.next([("cleared",), *contents])
            async for step_events in events:
                yield batches.next(step_events)
        except EngineDeadError:  # an engine core in a process of its own died: the subscription ends with why
            await context.abort(grpc.StatusCode.INTERNAL, "engine failure: the KV cache's events end here")
        finally:
            await events.aclose()


class KvEventBatches:
    """The protocol's KvEventBatch messages for one subscription: sequence numbers and event ids run on."""

    def __init__(self, start_sequence_number: int, block_size: int):
        self.sequence_number = start_sequence_number
        self.event_id = 0
        self.block_size = block_size

    def next(self, events: list) -> common_pb2.KvEventBatch:
        self.sequence_number += 1
        batch = common_pb2.KvEventBatch(sequence_number=self.sequence_number, timestamp=time.time())
        for event in events:
            self.event_id += 1
            batch.events.append(self._event(event))
        return batch

    def _event(self, event: tuple) -> common_pb2.KvCacheEvent:
        kind = event[0]
        if kind == "stored":
            _, block_hash, parent, token_ids = event
            stored = common_pb2.KvBlocksStored(blocks=[common_pb2.KvBlock(
                block_hash=block_hash, token_ids=token_ids, block_size=self.block_size)])
            if parent is not None:
                stored.parent_block_hash = parent
            return common_pb2.KvCacheEvent(event_id=self.event_id, stored=stored)
        if kind == "removed":
            return common_pb2.KvCacheEvent(event_id=self.event_id,
                                           removed=common_pb2.KvBlocksRemoved(block_hashes=[event[1]]))
        assert kind == "cleared", event
        return common_pb2.KvCacheEvent(event_id=self.event_id, cleared=common_pb2.KvCacheCleared())


def tokenizer_zip(tokenizer) -> bytes:
    """The tokenizer's files (tokenizer.json, its config with the chat template) as one zip, as the protocol
    streams them."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(Path(tmp).iterdir()):
                if path.is_file():
                    archive.write(path, path.name)
    return buffer.getvalue()


def _token_id(model_config, tokenizer, kind: str) -> int:
    value = getattr(model_config, f"{kind}_token_id", None)
    if value is None and tokenizer is not None:
        value = getattr(tokenizer, f"{kind}_token_id", None)
    if isinstance(value, list):
        value = value[0] if value else None
    return -1 if value is None else int(value)
