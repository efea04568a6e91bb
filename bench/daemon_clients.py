"""Client processes for bench/daemon_vs_offline.py: each streams its share of the requests over real gRPC, all at
once after a common start, and counts what came back. Raw stubs, no wrappers: a client's Python per message is
kept small, so the daemon, not the client, is what is measured (and several processes share the load).

Two protocols: beastserve.v1.Generation's GenerateStream (token ids and text) and the gateways' worker protocol,
vllm.grpc.engine.VllmEngine's Generate with stream=true (token ids only)."""

from __future__ import annotations

import asyncio
import hashlib
import time

import grpc

SERVICES = ("beastserve.v1", "vllm")
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]


def token_digest(token_ids: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, token_ids)).encode()).hexdigest()[:16]


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


async def _v1_stream(stub, request_id: str, prompt: list[int], output_len: int) -> tuple[list[int], int, str, str]:
    from server.proto.beastserve.v1 import generate_pb2 as pb

    request = pb.GenerateRequest(request_id=request_id, token_ids=pb.TokenIds(ids=prompt),
                                 sampling=pb.SamplingParams(temperature=0.0),
                                 stopping=pb.StoppingCriteria(max_tokens=output_len, ignore_eos=True))
    tokens, messages, finish, text = [], 0, "", []
    async for response in stub.GenerateStream(request):
        messages += 1
        tokens += response.token_ids
        text.append(response.text)
        if response.finish_reason:
            finish = pb.FinishReason.Name(response.finish_reason)
    return tokens, messages, finish, "".join(text)


async def _vllm_stream(stub, request_id: str, prompt: list[int], output_len: int) -> tuple[list[int], int, str, str]:
    from smg_grpc_proto.generated import vllm_engine_pb2 as vpb

    request = vpb.GenerateRequest(request_id=request_id, tokenized=vpb.TokenizedInput(input_ids=prompt),
                                  sampling_params=vpb.SamplingParams(temperature=0.0, max_tokens=output_len,
                                                                     ignore_eos=True), stream=True)
    tokens, messages, finish = [], 0, ""
    async for response in stub.Generate(request):
        messages += 1
        if response.HasField("chunk"):
            tokens += response.chunk.token_ids
        elif response.HasField("complete"):
            finish = response.complete.finish_reason
    return tokens, messages, finish, ""  # token ids only: the gateway makes the text


def _stub(service: str, channel):
    if service == "vllm":
        from smg_grpc_proto.generated import vllm_engine_pb2_grpc as vpb_grpc

        return vpb_grpc.VllmEngineStub(channel), _vllm_stream
    from server.proto.beastserve.v1 import generate_pb2_grpc as pb_grpc

    return pb_grpc.GenerationStub(channel), _v1_stream


async def _run(address: str, service: str, requests: list[tuple[str, list[int]]], output_len: int,
               start_at: float) -> dict:
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        await channel.channel_ready()
        stub, stream = _stub(service, channel)
        await asyncio.sleep(max(0.0, start_at - time.time()))
        wall0, cpu0 = time.time(), time.process_time()

        async def one(request_id: str, prompt: list[int]) -> tuple[str, tuple | str]:
            try:
                return request_id, await stream(stub, request_id, prompt, output_len)
            except grpc.aio.AioRpcError as exc:
                return request_id, f"{exc.code().name}: {exc.details()}"

        answers = await asyncio.gather(*(one(rid, prompt) for rid, prompt in requests))
        end = time.time()
    result = dict(start=wall0, end=end, cpu_s=time.process_time() - cpu0, tokens=0, messages=0, errors=[],
                  digests={}, text_digests={})
    for request_id, answer in answers:
        if isinstance(answer, str):
            result["errors"].append(f"{request_id}: {answer}")
            continue
        tokens, messages, finish, text = answer
        result["tokens"] += len(tokens)
        result["messages"] += messages
        result["digests"][request_id] = token_digest(tokens)
        result["text_digests"][request_id] = text_digest(text)
        if len(tokens) != output_len or not finish:
            result["errors"].append(f"{request_id}: {len(tokens)} tokens of {output_len}, finish {finish!r}")
    return result


def client(address: str, service: str, requests: list[tuple[str, list[int]]], output_len: int, start_at: float,
           results) -> None:
    """One client process's work (a multiprocessing target): its result dict goes on the results queue."""
    results.put(asyncio.run(_run(address, service, requests, output_len, start_at)))
