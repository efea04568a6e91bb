"""How server/loadgen/load.py sends one request and times it, over each protocol it can drive: the daemon's
streaming gRPC (`grpc`) or an OpenAI-compatible HTTP server (`openai`: vLLM's own, or beastserve behind a gateway).
Each backend answers the same questions (the server's facts, one timed request), so one load runs against either."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import grpc

from server.client import READINESS_SERVICE, AsyncClient

BACKENDS = ("grpc", "openai")
DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"  # vLLM's OpenAI server


@dataclass
class Request:
    prompt: str | list[int]
    prompt_len: int  # an estimate until the server's usage says
    output_len: int


@dataclass
class Record:
    """One request as the client saw it; times in seconds from sending it."""
    prompt_tokens: int
    output_tokens: int = 0
    cached_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)  # one entry per token after the first message's
    error: str | None = None  # the gRPC status code's name, "HTTP <status>", or the HTTP client's exception class

    @property
    def tpot(self) -> float:
        # The first token's time is TTFT; a one-token answer has no time per further token.
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


@dataclass
class ServerFacts:
    model: str
    max_model_len: int | None  # None where the server does not say
    vocab_size: int | None


class ServerError(Exception):
    """The server did not answer a question about itself (not a request of the load: those become records)."""


def record_arrivals(record: Record, start: float, arrivals: list[tuple[float, int]], end: float) -> None:
    """Fills the record's timings from (time, tokens) per message that carried output."""
    last = start
    for now, num_tokens in arrivals:
        if record.output_tokens:
            # A message carries several tokens when the client falls behind; each gets its share of the gap.
            record.itl += [(now - last) / num_tokens] * num_tokens
        else:
            record.ttft = now - start
        last = now
        record.output_tokens += num_tokens
    record.e2e = end - start


class GrpcBackend:
    """The daemon's own streaming RPC, where every message says which tokens it carries."""

    name = "grpc"

    def __init__(self, args: argparse.Namespace):
        self.endpoint, self.args = args.address, args
        self.client = AsyncClient(args.address, api_key=args.api_key, tls_ca_file=args.tls_ca_file,
                                  tls_cert_file=args.tls_cert_file, tls_key_file=args.tls_key_file,
                                  timeout=args.timeout)

    async def facts(self) -> ServerFacts:
        try:
            if (status := await self.client.health(READINESS_SERVICE)) != "SERVING":
                raise ValueError(f"the daemon at {self.endpoint} is {status}, not SERVING")
            info = await self.client.model_info()
        except grpc.RpcError as exc:
            raise ServerError(f"{exc.code().name}: {exc.details()}") from exc
        return ServerFacts(info.model, info.max_model_len, info.vocab_size)

    async def send(self, request: Request) -> Record:
        record, arrivals = Record(prompt_tokens=request.prompt_len), []
        params = dict(max_tokens=request.output_len, temperature=self.args.temperature,
                      ignore_eos=self.args.ignore_eos)
        if self.args.chat:
            params["chat"] = [{"role": "user", "content": request.prompt}]
        else:
            params["prompt"] = request.prompt
        start = time.perf_counter()
        try:
            async for response in self.client.stream(**params):
                if num_tokens := len(response.token_ids):
                    arrivals.append((time.perf_counter(), num_tokens))
                if response.HasField("usage"):
                    record.prompt_tokens = response.usage.prompt_tokens
                    record.cached_tokens = response.usage.cached_tokens
        except grpc.aio.AioRpcError as exc:
            record.error = exc.code().name
            return record
        record_arrivals(record, start, arrivals, time.perf_counter())
        return record

    async def close(self) -> None:
        await self.client.close()


class OpenAIBackend:
    """An OpenAI-compatible server's streaming completions (or chat completions), through the openai SDK."""

    name = "openai"

    def __init__(self, args: argparse.Namespace):
        import openai

        self.endpoint, self.args, self.model = args.base_url, args, args.model
        # No retries: a retried request would be timed as one slow success.
        self.client = openai.AsyncOpenAI(base_url=args.base_url, api_key=args.api_key or "none",
                                         timeout=args.timeout, max_retries=0)
        self.openai = openai  # imported here: the gRPC load needs no openai package

    async def facts(self) -> ServerFacts:
        try:
            models = [model async for model in self.client.models.list()]
        except self.openai.APIError as exc:
            raise ServerError(f"GET {self.endpoint}/models: {type(exc).__name__}: {exc}") from exc
        if not models:
            raise ValueError(f"{self.endpoint}/models lists no model")
        names = [model.id for model in models]
        if self.model is None:
            self.model = names[0]
        elif self.model not in names:
            raise ValueError(f"--model {self.model!r} is not served at {self.endpoint}; it serves {names}")
        served = models[names.index(self.model)]
        # vLLM's /v1/models adds max_model_len to OpenAI's fields; others may not.
        return ServerFacts(self.model, (served.model_extra or {}).get("max_model_len"), None)

    async def send(self, request: Request) -> Record:
        record, chunk_times, usage = Record(prompt_tokens=request.prompt_len), [], None
        start = time.perf_counter()
        try:
            async for chunk in await self.create(request):
                if chunk.choices and chunk_text(chunk.choices[0]):
                    chunk_times.append(time.perf_counter())
                usage = chunk.usage or usage
        except self.openai.APIError as exc:
            status = isinstance(exc, self.openai.APIStatusError)
            record.error = f"HTTP {exc.status_code}" if status else type(exc).__name__
            return record
        end = time.perf_counter()
        output_tokens = usage.completion_tokens if usage else len(chunk_times)
        record_arrivals(record, start, spread_tokens(chunk_times, output_tokens), end)
        if usage:
            details = usage.prompt_tokens_details
            record.prompt_tokens, record.cached_tokens = usage.prompt_tokens, (details and details.cached_tokens) or 0
        return record

    def create(self, request: Request):
        params = dict(model=self.model, max_tokens=request.output_len, temperature=self.args.temperature,
                      stream=True, stream_options={"include_usage": True})
        if self.args.ignore_eos:
            params["extra_body"] = {"ignore_eos": True}  # vLLM's extension; smg passes it through
        if self.args.chat:
            return self.client.chat.completions.create(messages=[{"role": "user", "content": request.prompt}],
                                                       **params)
        return self.client.completions.create(prompt=request.prompt, **params)

    async def close(self) -> None:
        await self.client.close()


def chunk_text(choice) -> str | None:
    return choice.delta.content if hasattr(choice, "delta") else choice.text


def spread_tokens(chunk_times: list[float], output_tokens: int) -> list[tuple[float, int]]:
    """(time, tokens) per content chunk. Over HTTP a chunk says its text, not how many tokens made it (a
    detokenizer holding back a partial character sends two at once), so this is an approximation: the first
    chunk is taken as one token and the rest of the usage's count is shared as evenly as whole tokens allow
    among the later chunks. Where every chunk is one token, as from vLLM and smg when the client keeps up, it
    is exact."""
    if not chunk_times:
        return []
    if len(chunk_times) == 1 or output_tokens <= len(chunk_times):
        later = [1] * (len(chunk_times) - 1)
    else:
        share, extra = divmod(output_tokens - 1, len(chunk_times) - 1)
        later = [share + (i < extra) for i in range(len(chunk_times) - 1)]
    first = max(1, output_tokens - sum(later))
    return list(zip(chunk_times, [first, *later]))


def open_backend(args: argparse.Namespace) -> GrpcBackend | OpenAIBackend:
    return {"grpc": GrpcBackend, "openai": OpenAIBackend}[args.backend](args)
