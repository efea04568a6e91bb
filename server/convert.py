"""Between the wire and the engine: validate a GenerateRequest into engine inputs, and turn
engine outputs into GenerateResponses. Errors name the request field, in proto terms."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from scheduler import SamplingParams, StructuredOutputsParams
from scheduler.core.outputs import RequestOutput
from scheduler.io.inputs import InputProcessor
from server.proto.beastserve.v1 import generate_pb2 as pb

if TYPE_CHECKING:
    from scheduler import Engine
    from server.edge import EdgeWork

# Engine messages start with the engine's field name; say where it lives in the request.
_FIELD_PATHS = {
    "temperature": "sampling.temperature", "top_p": "sampling.top_p", "top_k": "sampling.top_k",
    "min_p": "sampling.min_p", "repetition_penalty": "sampling.repetition_penalty",
    "frequency_penalty": "sampling.frequency_penalty", "presence_penalty": "sampling.presence_penalty",
    "seed": "sampling.seed", "n": "sampling.n", "max_tokens": "stopping.max_tokens",
    "min_tokens": "stopping.min_tokens",
    "stop": "stopping.stop", "stop_token_ids": "stopping.stop_token_ids", "logprobs": "output.logprobs",
    "logit_bias": "sampling.logit_bias", "prompt_logprobs": "output.prompt_logprobs",
    "truncate_prompt_tokens": "truncate_prompt_tokens", "prompt": "input",
}


class InvalidArgument(ValueError):
    pass


def field_error(exc: ValueError) -> InvalidArgument:
    """Prefix an engine ValueError with the request field it is about."""
    message = str(exc)
    first = message.split(" ", 1)[0].rstrip(":")
    path = _FIELD_PATHS.get(first)
    return InvalidArgument(f"{path}: {message}" if path else message)


async def to_engine_inputs(request: pb.GenerateRequest, engine: Engine, edge: EdgeWork) -> tuple[list[int],
                                                                                             SamplingParams]:
    """Validate a request once, at the edge: the cheap checks first, then the work that grows with the input
    (tokenising, the chat template, the grammar's compile) off the event loop. Raises InvalidArgument naming
    the field."""
    params = check_request(request)
    try:
        token_ids = engine.inputs.prepare(await prompt_token_ids(request, engine.inputs, edge), params)
        await edge.compile_grammar(engine, params)
    except InvalidArgument:
        raise
    except ValueError as exc:
        raise field_error(exc) from None
    return token_ids, params


def check_request(request: pb.GenerateRequest) -> SamplingParams:
    """Everything that can be checked without the model (the clients check this too): the input's form and the
    sampling, stopping and output fields. Raises InvalidArgument naming the field."""
    try:
        params = sampling_params(request)
    except InvalidArgument:
        raise
    except ValueError as exc:
        raise field_error(exc) from None
    kind = request.WhichOneof("input")
    if kind is None:
        raise InvalidArgument("input: one of text, token_ids or chat is required")
    if kind == "text" and not request.text:
        raise InvalidArgument("text: the prompt must not be empty")
    if kind == "token_ids" and not request.token_ids.ids:
        raise InvalidArgument("token_ids.ids: the prompt must not be empty")
    if kind == "chat":
        chat_messages(request.chat, "chat")
    return params


async def prompt_token_ids(request: pb.GenerateRequest, inputs: InputProcessor, edge: EdgeWork) -> list[int]:
    kind = request.WhichOneof("input")
    if kind == "text":
        return await tokenize_text(request.text, "text", inputs, edge)
    if kind == "token_ids":
        return list(request.token_ids.ids)
    return await render_chat(chat_messages(request.chat, "chat"), "chat", inputs, edge)


async def tokenize_text(text: str, field: str, inputs: InputProcessor, edge: EdgeWork,
                        add_special_tokens: bool = True) -> list[int]:
    """A text's token ids: refused (ValueError naming `field`) if it cannot fit, before it is tokenised."""
    inputs.check_text_size(text, field)
    return await edge.call(len(text), inputs.tokenize, text, add_special_tokens)


async def render_chat(messages: list[dict[str, str]], field: str, inputs: InputProcessor, edge: EdgeWork) -> list[int]:
    """A chat's token ids under the model's template: refused (ValueError naming `field`) if it cannot fit,
    before the template runs."""
    size = sum(len(m["content"]) for m in messages)
    inputs.check_text_size("".join(m["content"] for m in messages), field)
    return await edge.call(size, inputs.render_chat, messages)


def chat_messages(chat: pb.Chat, field: str) -> list[dict[str, str]]:
    return check_chat_messages([{"role": m.role, "content": m.content} for m in chat.messages], f"{field}.messages")


def check_chat_messages(messages: list[dict[str, str]], field: str) -> list[dict[str, str]]:
    """A chat's messages, checked for what every surface requires; errors name `field[i]`."""
    for i, m in enumerate(messages):
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise InvalidArgument(f"{field}[{i}].role: must be system, user, assistant or tool, got {m['role']!r}")
        if m["role"] != "assistant" and not m["content"]:
            raise InvalidArgument(f"{field}[{i}].content: must not be empty")
    if not messages:
        raise InvalidArgument(f"{field}: at least one message is required")
    return messages


def sampling_params(request: pb.GenerateRequest) -> SamplingParams:
    s, stop, out = request.sampling, request.stopping, request.output
    kwargs = {}
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "frequency_penalty",
                 "presence_penalty", "seed", "n"):
        if s.HasField(name):
            value = getattr(s, name)
            if isinstance(value, float) and not math.isfinite(value):
                raise InvalidArgument(f"sampling.{name}: must be a finite number, got {value}")
            kwargs[name] = value
    kwargs["max_tokens"] = stop.max_tokens if stop.HasField("max_tokens") else None
    if out.HasField("prompt_logprobs"):
        kwargs["prompt_logprobs"] = out.prompt_logprobs
    if request.HasField("truncate_prompt_tokens"):
        kwargs["truncate_prompt_tokens"] = request.truncate_prompt_tokens
    kwargs["logit_bias"] = dict(s.logit_bias)
    return SamplingParams(
        **kwargs, structured_outputs=structured_outputs(request), min_tokens=stop.min_tokens, stop=list(stop.stop),
        stop_token_ids=list(stop.stop_token_ids),
        ignore_eos=stop.ignore_eos, include_stop_str_in_output=stop.include_stop_str_in_output,
        logprobs=out.logprobs, skip_special_tokens=out.skip_special_tokens if out.HasField("skip_special_tokens")
        else True)


def structured_outputs(request: pb.GenerateRequest) -> StructuredOutputsParams | None:
    """The request's constraint, checked for form (the grammar itself is parsed by the server)."""
    if not request.HasField("structured_outputs"):
        return None
    so = request.structured_outputs
    kind = so.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument("structured_outputs: set one of json, json_object, regex, choice, grammar or "
                              "structural_tag")
    if kind == "json_object" and not so.json_object:
        raise InvalidArgument("structured_outputs.json_object: must be true when set")
    value = list(so.choice.choices) if kind == "choice" else getattr(so, kind)
    return StructuredOutputsParams(**{kind: value})


def speculative_options(request: pb.GenerateRequest) -> dict:
    spec = request.speculative
    return {"speculative": spec.enabled if spec.HasField("enabled") else None,
            "max_draft_tokens": spec.max_draft_tokens if spec.HasField("max_draft_tokens") else None}


def _token_logprob(lp) -> pb.TokenLogprob:
    return pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                           top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])


# The offline API's words (FinishReason in scheduler/core/request.py) are the proto's and the metrics label's.
_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}


def finish_reason_name(value: int) -> str | None:
    """The word for a FinishReason value (None while streaming): stop, length or abort."""
    return None if value == pb.FINISH_REASON_UNSPECIFIED else pb.FinishReason.Name(value).removeprefix(
        "FINISH_REASON_").lower()


def to_unary_response(request_id: str, outputs: list[RequestOutput], n: int) -> pb.GenerateResponse:
    """The whole answer: for n > 1, each completion in `choices`, in index order."""
    if n == 1:
        return to_response(request_id, outputs)
    return pb.GenerateResponse(request_id=request_id, choices=[
        to_response(request_id, [o for o in outputs if o.index == i]) for i in range(n)])


def to_response(request_id: str, outputs: list[RequestOutput]) -> pb.GenerateResponse:
    """One response for one or more consecutive deltas of one completion (one when streaming, all of them for
    unary)."""
    response = pb.GenerateResponse(request_id=request_id, index=outputs[-1].index)
    for output in outputs:
        response.token_ids.extend(output.token_ids)
        response.text += output.text
        response.logprobs.extend(_token_logprob(lp) for lp in output.logprobs or ())
        response.prompt_logprobs.extend(pb.PromptLogprob(logprob=_token_logprob(lp) if lp is not None else None)
                                        for lp in output.prompt_logprobs or ())
    last = outputs[-1]
    if last.finished:
        response.finish_reason = _FINISH[last.finish_reason]
        if isinstance(last.stop_reason, str):
            response.stop_string = last.stop_reason
        elif last.stop_reason is not None:
            response.stop_token_id = last.stop_reason
        response.held_back_bytes = last.held_back_bytes
        response.usage.CopyFrom(pb.Usage(prompt_tokens=last.num_prompt_tokens,
                                         completion_tokens=last.num_output_tokens,
                                         cached_tokens=last.num_cached_tokens))
        if last.metrics is not None:
            m = last.metrics
            response.timing.CopyFrom(pb.Timing(queue_s=m.queue_s, ttft_s=m.ttft_s, e2e_s=m.e2e_s,
                                               preemptions=m.preemptions, draft_tokens=m.draft_tokens,
                                               accepted_tokens=m.accepted_tokens))
    return response
