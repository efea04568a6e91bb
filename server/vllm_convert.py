"""Between the gateways' worker protocol (`vllm.grpc.engine`, from the smg-grpc-proto package) and the engine:
a GenerateRequest into engine inputs, engine outputs into GenerateResponses. Errors name the request field.

The protocol is proto3, so a number the gateway left out reads as 0: where 0 is not a meaningful value
(top_p, repetition_penalty) it means "unset", as in vLLM's own servicer. A field we cannot honour is refused,
never ignored."""

from __future__ import annotations

from typing import TYPE_CHECKING

from smg_grpc_proto.generated import vllm_engine_pb2 as vpb

from scheduler import SamplingParams, StructuredOutputsParams
from scheduler.core.outputs import RequestOutput
from scheduler.io.inputs import InputProcessor
from server.convert import InvalidArgument, tokenize_text

if TYPE_CHECKING:
    from scheduler import Engine
    from server.edge import EdgeWork

# What the engine supports of SamplingParams, field by field (proto name -> SamplingParams name).
_PLAIN = ("min_p", "frequency_penalty", "presence_penalty", "min_tokens", "ignore_eos", "include_stop_str_in_output",
          "skip_special_tokens")
# Read nowhere: `grammar_from_first_token` holds whatever its value (the engine runs no reasoning parser, so every
# constraint starts at the first generated token); `spaces_between_special_tokens` changes only a slow tokenizer's
# decoding of special tokens kept in the text (a fast one's decode does not take it).
# The protocol's constraints by our names (StructuredOutputsParams).
_CONSTRAINTS = {"json_schema": "json", "regex": "regex", "grammar": "grammar", "json_object": "json_object",
                "choice": "choice", "structural_tag": "structural_tag"}


async def to_engine_inputs(request: vpb.GenerateRequest, engine: Engine,
                           edge: EdgeWork) -> tuple[list[int], SamplingParams, int]:
    """(prompt token ids, sampling params, logprobs asked for or -1) for a request; InvalidArgument names the field
    at fault. The engine reports logprobs for at least one alternative, so "0" (the chosen token's only) is
    asked of it as 1 and cut back on the way out. The cheap checks come first, then the work that grows with
    the input (tokenising a text prompt, the grammar's compile), off the event loop."""
    refuse_unsupported(request)
    s = request.sampling_params
    kwargs = {name: getattr(s, name) for name in _PLAIN}
    kwargs.update(temperature=s.temperature if s.HasField("temperature") else 1.0, top_p=s.top_p or 1.0,
                  top_k=s.top_k, repetition_penalty=s.repetition_penalty or 1.0,
                  max_tokens=s.max_tokens if s.HasField("max_tokens") else None, stop=list(s.stop),
                  stop_token_ids=list(s.stop_token_ids), seed=s.seed if s.HasField("seed") else None, n=s.n or 1)
    logprobs = s.logprobs if s.HasField("logprobs") else -1
    if logprobs < -1 or logprobs == -1 and s.HasField("logprobs"):
        raise InvalidArgument(f"sampling_params.logprobs: the whole vocabulary's logprobs (-1) are not served; "
                              f"ask for at most 20, got {logprobs}")
    kwargs["logprobs"] = max(logprobs, 1) if logprobs >= 0 else 0
    if s.HasField("prompt_logprobs"):
        if s.prompt_logprobs == -1:
            raise InvalidArgument("sampling_params.prompt_logprobs: the whole vocabulary's logprobs (-1) are not "
                                  "served; ask for at most 20")
        kwargs["prompt_logprobs"] = s.prompt_logprobs
    if s.HasField("truncate_prompt_tokens"):
        kwargs["truncate_prompt_tokens"] = s.truncate_prompt_tokens
    kwargs["logit_bias"] = dict(s.logit_bias)
    kwargs["structured_outputs"] = structured_outputs(s)
    try:
        params = SamplingParams(**kwargs)
        token_ids = engine.inputs.prepare(await prompt_token_ids(request, engine.inputs, edge), params)
    except ValueError as exc:
        raise _field_error(exc) from None
    try:
        await edge.compile_grammar(engine, params)
    except ValueError as exc:
        raise _constraint_error(s, exc) from None
    return token_ids, params, logprobs


def refuse_unsupported(request: vpb.GenerateRequest) -> None:
    for name in ("mm_inputs", "media_refs", "kv_transfer_params", "kv_transfer_params_json"):
        if request.HasField(name):
            raise InvalidArgument(f"{name}: not served (a text-only engine, without disaggregated prefill)")
    if request.extra_mm_inputs:
        raise InvalidArgument("extra_mm_inputs: not served (a text-only engine)")
    if request.HasField("data_parallel_rank") and request.data_parallel_rank != 0:
        raise InvalidArgument(f"data_parallel_rank: this worker has one rank (0), got {request.data_parallel_rank}")


def structured_outputs(s: vpb.SamplingParams) -> StructuredOutputsParams | None:
    """The constraint, checked for form, size and nesting (the gateway sends json_object as json_schema
    '{"type":"object"}', which is served as that schema); its grammar is compiled once these pass."""
    constraint = s.WhichOneof("constraint")
    if constraint is None or (constraint == "json_object" and not s.json_object):  # false: unconstrained
        return None
    value = list(s.choice.choices) if constraint == "choice" else getattr(s, constraint)
    try:
        return StructuredOutputsParams(**{_CONSTRAINTS[constraint]: value})
    except ValueError as exc:
        raise _constraint_error(s, exc) from None


def _constraint_error(s: vpb.SamplingParams, exc: ValueError) -> InvalidArgument:
    """The engine's structured_outputs.<kind> error, named as this protocol's field."""
    reason = str(exc).split(": ", 1)[-1]
    return InvalidArgument(f"sampling_params.{s.WhichOneof('constraint')}: {reason}")


async def prompt_token_ids(request: vpb.GenerateRequest, inputs: InputProcessor, edge: EdgeWork) -> list[int]:
    kind = request.WhichOneof("input")
    if kind is None:
        raise InvalidArgument("input: one of tokenized or text is required")
    if kind == "text":
        if not request.text:
            raise InvalidArgument("text: the prompt must not be empty")
        token_ids = await tokenize_text(request.text, "text", inputs, edge)
    else:
        token_ids = list(request.tokenized.input_ids)
        if not token_ids:
            raise InvalidArgument("tokenized.input_ids: the prompt must not be empty")
    return token_ids  # truncate_prompt_tokens is the engine's (InputProcessor.prepare)


def _field_error(exc: ValueError) -> InvalidArgument:
    message = str(exc)
    first = message.split(" ", 1)[0].rstrip(":")
    if first == "prompt":
        return InvalidArgument(f"input: {message}")
    if first in vpb.SamplingParams.DESCRIPTOR.fields_by_name:
        return InvalidArgument(f"sampling_params.{first}: {message}")
    return InvalidArgument(message)


class Responses:
    """One request's engine outputs as the protocol's messages, each completion (of n) on its own index."""

    def __init__(self, stream: bool, logprobs: int, prompt_token_ids: list[int] = ()):
        self.stream, self.logprobs, self.prompt_token_ids = stream, logprobs, list(prompt_token_ids)
        self.completions: dict[int, ResponseBuilder] = {}

    def add(self, output: RequestOutput) -> list[vpb.GenerateResponse]:
        builder = self.completions.get(output.index)
        if builder is None:
            builder = self.completions[output.index] = ResponseBuilder(self.stream, self.logprobs,
                                                                       self.prompt_token_ids, output.index)
        return builder.add(output)


class ResponseBuilder:
    """Turns one completion's engine outputs into the protocol's messages: a chunk per delta when streaming, and
    the GenerateComplete at the end (holding every output token when not streaming). Prompt logprobs, like
    output logprobs, go in the chunks when streaming (the first one) and in the GenerateComplete when not."""

    def __init__(self, stream: bool, logprobs: int, prompt_token_ids: list[int] = (), index: int = 0):
        self.stream = stream
        self.prompt_token_ids = list(prompt_token_ids)
        self.logprobs = logprobs
        self.index = index
        self.output_ids: list[int] = []
        self.lp = vpb.OutputLogProbs()
        self.input_lp: vpb.InputLogProbs | None = None

    def add(self, output: RequestOutput) -> list[vpb.GenerateResponse]:
        delta_lp = self._logprobs(output)
        if output.prompt_logprobs is not None:
            self.input_lp = input_logprobs(self.prompt_token_ids, output.prompt_logprobs)
        self.output_ids += output.token_ids
        if delta_lp is not None and not self.stream:
            self.lp.MergeFrom(delta_lp)
        messages = []
        if self.stream and output.token_ids:
            chunk = vpb.GenerateStreamChunk(token_ids=output.token_ids, prompt_tokens=output.num_prompt_tokens,
                                            completion_tokens=len(self.output_ids),
                                            cached_tokens=output.num_cached_tokens, index=self.index)
            if delta_lp is not None:
                chunk.output_logprobs.CopyFrom(delta_lp)
            if output.prompt_logprobs is not None:
                chunk.input_logprobs.CopyFrom(self.input_lp)
            messages.append(vpb.GenerateResponse(chunk=chunk))
        if output.finished:
            messages.append(vpb.GenerateResponse(complete=self._complete(output)))
        return messages

    def _complete(self, last: RequestOutput) -> vpb.GenerateComplete:
        complete = vpb.GenerateComplete(
            output_ids=[] if self.stream else self.output_ids, finish_reason=last.finish_reason,
            prompt_tokens=last.num_prompt_tokens, completion_tokens=len(self.output_ids),
            cached_tokens=last.num_cached_tokens, index=self.index)
        if isinstance(last.stop_reason, str):
            complete.matched_stop_str = last.stop_reason
        elif last.stop_reason is not None:
            complete.matched_token_id = last.stop_reason
        if last.metrics is not None:
            complete.spec_draft_tokens = last.metrics.draft_tokens
            complete.spec_accepted_tokens = last.metrics.accepted_tokens
        if self.logprobs >= 0 and not self.stream:
            complete.output_logprobs.CopyFrom(self.lp)
        if self.input_lp is not None and not self.stream:
            complete.input_logprobs.CopyFrom(self.input_lp)
        return complete

    def _logprobs(self, output: RequestOutput) -> vpb.OutputLogProbs | None:
        if self.logprobs < 0 or not output.logprobs:
            return None
        return vpb.OutputLogProbs(
            token_logprobs=[lp.logprob for lp in output.logprobs], token_ids=[lp.token_id for lp in output.logprobs],
            top_logprobs=[vpb.TopLogProbs(values=[v for _, v in lp.top[:self.logprobs]],
                                          token_ids=[t for t, _ in lp.top[:self.logprobs]])
                          for lp in output.logprobs])


def input_logprobs(prompt_token_ids: list[int], entries: list) -> vpb.InputLogProbs:
    """The protocol's prompt logprobs: the first token's value unset (it has no context), as vLLM sends them."""
    message = vpb.InputLogProbs(token_ids=prompt_token_ids)
    for lp in entries:
        if lp is None:
            message.token_logprobs.append(vpb.InputTokenLogProb())
            message.top_logprobs.append(vpb.TopLogProbs())
        else:
            message.token_logprobs.append(vpb.InputTokenLogProb(value=lp.logprob))
            top_ids, top_values = zip(*lp.top) if lp.top else ((), ())
            message.top_logprobs.append(vpb.TopLogProbs(values=top_values, token_ids=top_ids))
    return message
