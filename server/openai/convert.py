"""OpenAI requests into engine inputs: prompts as token ids and one SamplingParams, built and checked as the gRPC
services build them (SamplingParams' own checks; server/convert.py's text limits, tokenising and chat templates off
the event loop; the grammar compiled before the request is queued). Errors are InvalidArgument whose message starts
with the request field at fault."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from scheduler import SamplingParams, StructuredOutputsParams
from server.convert import InvalidArgument, check_chat_messages, render_chat, tokenize_text
from server.openai.protocol import ChatCompletionRequest, CompletionRequest, Message, Sampling

if TYPE_CHECKING:
    from scheduler import Engine
    from server.edge import EdgeWork

MAX_PROMPTS = 1024  # prompts in one completions request; each is a request of its own in the engine
# SamplingParams' fields that keep the same name on the wire.
_SAME_NAMES = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty",
               "seed", "n", "min_tokens", "ignore_eos", "include_stop_str_in_output", "skip_special_tokens",
               "prompt_logprobs", "truncate_prompt_tokens", "stop_token_ids")


@dataclass
class Prepared:
    """A request ready for the engine: one engine request per prompt, each with params.n completions."""

    prompts: list[list[int]]
    params: SamplingParams
    logprobs: int | None = None  # alternatives to report per output token; None: no logprobs
    echo: bool = False
    prompt_texts: list[str | None] = field(default_factory=list)  # the prompts as sent, for echo
    options: dict = field(default_factory=dict)  # speculation, as on gRPC
    priority: int = 0
    report_prompt_logprobs: bool = False  # asked for by name (echo's logprobs come with the echoed tokens)


async def prepare_completion(request: CompletionRequest, engine: Engine, edge: EdgeWork) -> Prepared:
    """A /v1/completions request: text, token ids, or a batch of either."""
    if request.suffix:
        raise InvalidArgument("suffix: insertion (text after the completion) is not served")
    if request.best_of is not None and request.best_of != (request.n or 1):
        raise InvalidArgument(f"best_of: only best_of = n is served (every completion is returned), got "
                              f"{request.best_of}")
    logprobs = request.logprobs
    if logprobs is not None and logprobs < 0:
        raise InvalidArgument(f"logprobs: must be in [0, 20], got {logprobs}")
    prompt_logprobs = request.prompt_logprobs
    if request.echo and logprobs is not None and prompt_logprobs is None:
        prompt_logprobs = logprobs  # echoed prompt tokens carry logprobs too
    params = sampling_params(request, max_tokens=request.max_tokens, logprobs=logprobs,
                             prompt_logprobs=prompt_logprobs)
    texts, prompts = _prompts(request.prompt)
    token_ids, inputs = [], engine.inputs
    for i, (text, ids) in enumerate(zip(texts, prompts)):
        where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        try:
            if text is not None:
                ids = await tokenize_text(text, where, inputs, edge, request.add_special_tokens is not False)
            token_ids.append(inputs.prepare(ids, params))
        except ValueError as exc:
            raise _named(exc, where) from None
    await _compile_grammar(request, engine, edge, params)
    return Prepared(token_ids, params, logprobs, bool(request.echo), texts, speculative_options(request),
                    request.priority or 0, request.prompt_logprobs is not None)


async def prepare_chat(request: ChatCompletionRequest, engine: Engine, edge: EdgeWork) -> Prepared:
    """A /v1/chat/completions request: the messages rendered with the model's chat template."""
    if request.tools:
        raise InvalidArgument("tools: tool calling is not served by the daemon's own API; put the gateway (smg) in "
                              "front, which parses tool calls")
    if request.max_tokens is not None and request.max_completion_tokens is not None:
        raise InvalidArgument("max_completion_tokens: give max_tokens or max_completion_tokens, not both")
    if request.top_logprobs is not None and not request.logprobs:
        raise InvalidArgument("top_logprobs: needs logprobs: true")
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    try:
        params = sampling_params(request, max_tokens=max_tokens, logprobs=logprobs,
                                 prompt_logprobs=request.prompt_logprobs)
    except InvalidArgument as exc:
        raise InvalidArgument(_chat_names(str(exc), request)) from None
    messages = chat_messages(request.messages)
    try:
        token_ids = engine.inputs.prepare(await render_chat(messages, "messages", engine.inputs, edge), params)
    except ValueError as exc:
        raise _named(exc, "messages") from None
    await _compile_grammar(request, engine, edge, params)
    return Prepared([token_ids], params, logprobs, False, [None], speculative_options(request),
                    request.priority or 0, request.prompt_logprobs is not None)


def chat_messages(messages: list[Message]) -> list[dict]:
    """The messages as the chat template takes them; text parts of a message's content joined by newlines."""
    out = []
    for m in messages:
        content = m.content if isinstance(m.content, str) or m.content is None else "\n".join(
            part.text for part in m.content)
        message = {"role": m.role, "content": content or ""}
        if m.name is not None:
            message["name"] = m.name
        out.append(message)
    return check_chat_messages(out, "messages")


def sampling_params(request: Sampling, max_tokens: int | None, logprobs: int | None,
                    prompt_logprobs: int | None) -> SamplingParams:
    """The engine's parameters for a request. The engine reports at least one alternative per token, so logprobs
    0 (the chosen token's only) is asked of it as 1 and cut back on the way out."""
    if request.stream_options is not None and not request.stream:
        raise InvalidArgument("stream_options: only with stream: true")
    kwargs = {name: getattr(request, name) for name in _SAME_NAMES if getattr(request, name) is not None}
    kwargs.update(max_tokens=max_tokens, logprobs=0 if logprobs is None else max(logprobs, 1),
                  prompt_logprobs=prompt_logprobs, logit_bias=_logit_bias(request.logit_bias),
                  structured_outputs=structured_outputs(request))
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or ())
    try:
        return SamplingParams(stop=stop, **kwargs)
    except ValueError as exc:
        raise _named(exc) from None


def structured_outputs(request: Sampling) -> StructuredOutputsParams | None:
    """`response_format` (OpenAI's) or `structured_outputs` (vLLM's), checked for form and size; its grammar is
    compiled once every cheaper check has passed."""
    fmt, so = request.response_format, request.structured_outputs
    if fmt is not None and fmt.type != "text" and so is not None:
        raise InvalidArgument("structured_outputs: give response_format or structured_outputs, not both")
    if so is not None:
        return _build(StructuredOutputsParams, so.model_dump(by_alias=True, exclude_none=True), _constraint(request))
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutputsParams(json_object=True)
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise InvalidArgument("response_format.json_schema.schema: required with type json_schema")
    return _build(StructuredOutputsParams, {"json": fmt.json_schema.schema_}, _constraint(request))


def _constraint(request: Sampling) -> str:
    """The field that holds the request's constraint."""
    if request.structured_outputs is not None:
        return "structured_outputs"
    fmt = request.response_format
    return "response_format.json_schema.schema" if fmt.type == "json_schema" else "response_format"


async def _compile_grammar(request: Sampling, engine: Engine, edge: EdgeWork, params: SamplingParams) -> None:
    try:
        await edge.compile_grammar(engine, params)
    except ValueError as exc:
        raise InvalidArgument(f"{_constraint(request)}: {str(exc).split(': ', 1)[-1]}") from None


def speculative_options(request: Sampling) -> dict:
    spec = request.speculative
    if spec is None:
        return {"speculative": None, "max_draft_tokens": None}
    return {"speculative": spec.enabled, "max_draft_tokens": spec.max_draft_tokens}


def _build(cls, kwargs: dict, where: str):
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise InvalidArgument(f"{where}: {str(exc).split(': ', 1)[-1]}") from None


def _prompts(prompt) -> tuple[list[str | None], list[list[int] | None]]:
    """(texts, token ids) of each prompt, one of the two None."""
    if isinstance(prompt, str):
        return [prompt], [None]
    if not prompt:
        raise InvalidArgument("prompt: must not be empty")
    if all(isinstance(p, int) for p in prompt):
        return [None], [list(prompt)]
    if len(prompt) > MAX_PROMPTS:
        raise InvalidArgument(f"prompt: at most {MAX_PROMPTS} prompts in one request, got {len(prompt)}")
    if all(isinstance(p, str) for p in prompt):
        return list(prompt), [None] * len(prompt)
    return [None] * len(prompt), [list(p) for p in prompt]


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    out = {}
    for key, value in (bias or {}).items():
        try:
            out[int(key)] = value
        except ValueError:
            raise InvalidArgument(f"logit_bias: keys are token ids, got {key!r}") from None
    return out


def _named(exc: ValueError, where: str | None = None) -> InvalidArgument:
    """An engine error in the request's terms: prompt errors name the prompt (or `messages`) they are about."""
    message = str(exc)
    if where is not None and message.startswith("prompt") and not message.startswith(f"{where}:"):
        return InvalidArgument(f"{where}: {message}")
    return InvalidArgument(message)


def _chat_names(message: str, request: ChatCompletionRequest) -> str:
    """Chat's names for the engine's fields: top_logprobs for logprobs, max_completion_tokens when that was sent."""
    if message.startswith("logprobs"):
        return f"top_logprobs: {message}"
    if message.startswith("max_tokens") and request.max_completion_tokens is not None:
        return f"max_completion_tokens: {message}"
    return message
