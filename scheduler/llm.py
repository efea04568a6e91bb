"""Offline API: `LLM(model=...).generate(prompts, params)`."""

from __future__ import annotations

from collections.abc import Sequence

from scheduler.config import EngineConfig
from scheduler.core.outputs import CompletionOutput
from scheduler.core.params import SamplingParams
from scheduler.io.inputs import Prompt
from scheduler.io.stream_text import StreamText, made_by_reader
from scheduler.loop.engine import Engine


class LLM:
    """Runs the engine in the calling thread until every prompt is answered.

    LLM(model="default", device="auto", dtype="auto", **engine options) — see EngineConfig —
    or LLM(EngineConfig(...)).
    """

    def __init__(self, model="default", **kwargs):
        config = model if isinstance(model, EngineConfig) else EngineConfig(model=model, **kwargs)
        assert not (kwargs and isinstance(model, EngineConfig)), "options go in the EngineConfig"
        self.engine = Engine(config)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[CompletionOutput]:
        """prompts: strings or token-id lists; params: one for all, or one per prompt."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        token_ids = [self.engine.inputs.tokenize(p) for p in prompts]
        return self._run(token_ids, params)

    def chat(self, conversations: list[dict] | Sequence[list[dict]],
             params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[CompletionOutput]:
        """conversations: lists of {"role", "content"} messages, rendered with the model's chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        return self._run([self.engine.inputs.render_chat(list(c)) for c in conversations], params)

    def _run(self, token_ids: list[list[int]], params) -> list[CompletionOutput]:
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(token_ids)
        if len(params) != len(token_ids):
            raise ValueError(f"params: got {len(params)} for {len(token_ids)} prompts")
        # All or nothing: refuse before queueing any.
        token_ids = [self.engine.inputs.prepare(ids, p) for ids, p in zip(token_ids, params)]
        results, streams, by_id = [], [], {}
        for ids, p in zip(token_ids, params):
            # The text of a request without stop strings is made here, once, from all its tokens (stream_text.py).
            text = StreamText(self.engine.tokenizer, ids, p, self.engine.token_bytes) \
                if made_by_reader(p, self.engine.tokenizer) else None
            stream = self.engine.add_request(None, p, prompt_token_ids=ids, deltas=False,  # read at the end only
                                             detokenize=text is None)
            completions = [CompletionOutput(stream.request_id, ids, index=i) for i in range(p.n)]
            completions[0].outputs = completions
            results.append(completions[0])
            streams.append(stream)
            by_id[stream.request_id] = (completions[0], stream, text)
        while not all(s.finished for s in streams):
            # Each step's outputs (the requests that ended) are read as they come.
            for output in self.engine.step():
                _read(*by_id[output.request_id], once=True)
        for result, stream, text in by_id.values():
            _read(result, stream, text)
        return results


def _read(result: CompletionOutput, stream, text: StreamText | None, once: bool = False) -> None:
    """The stream's waiting outputs (one, where `once`) added to their completions, their text made where it is
    the reader's to make."""
    while (delta := stream.get_nowait()) is not None:
        result.outputs[delta.index].add(text.fill(delta) if text is not None else delta)
        if once:
            return
