"""One completions or chat request on the engine: an engine request per prompt, each run through EngineCalls (the
gRPC services' call path: readiness, queue limit, statuses, metrics, abort when the client goes), and their outputs
as the API's answer, whole or as server-sent events."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from scheduler.core.outputs import RequestOutput
from server.calls import EngineCalls
from server.openai.convert import Prepared
from server.openai.errors import HttpStatusError
from server.openai.responses import Choice, TokenText, prompt_logprobs, usage

_DONE = object()


class Generation:
    def __init__(self, calls: EngineCalls, call, prepared: Prepared, *, chat: bool, model: str, tokenizer,
                 as_ids: bool = False, request_id: str | None = None):
        self.calls, self.call, self.prepared, self.chat, self.model = calls, call, prepared, chat, model
        self.tokenizer, self.text = tokenizer, TokenText(tokenizer, as_ids)
        self.id = request_id or f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.choices: dict[int, Choice] = {}
        self.prompt_lp: dict[int, list] = {}  # prompt -> its prompt logprobs (with completion 0's first output)
        self.prompt_tokens: dict[int, tuple[int, int]] = {}  # prompt -> (tokens, cached tokens)

    def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt number, output) of every prompt's engine request, as they come."""
        p = self.prepared
        return merge([self.calls.run(self.call, ids, p.params, f"{self.id}-{i}" if len(p.prompts) > 1 else self.id,
                                     p.priority, **p.options) for i, ids in enumerate(p.prompts)])

    async def whole(self) -> dict:
        """The unary answer: every choice, in index order, and the usage."""
        outputs = [item async for item in self.outputs()]
        for prompt, output in outputs:  # prompt logprobs first: every choice's echo may need them
            self._note(prompt, output)
        for prompt, output in outputs:
            self._add(prompt, output)
        choices = [self.choices[i].whole() for i in sorted(self.choices)]
        body = self._head("chat.completion" if self.chat else "text_completion")
        body.update(choices=choices, usage=self._usage())
        if self.prepared.report_prompt_logprobs:
            lps = [prompt_logprobs(self.text, self.prepared.prompts[i], self.prompt_lp.get(i))
                   for i in range(len(self.prepared.prompts))]
            if self.chat:
                body["prompt_logprobs"] = lps[0]
            else:
                n = self.prepared.params.n
                for choice in choices:
                    choice["prompt_logprobs"] = lps[choice["index"] // n]
        return body

    async def events(self, outputs: AsyncIterator[tuple[int, RequestOutput]], stream_options) -> AsyncIterator[str]:
        """Server-sent events: a chunk per delta, the usage chunk when asked, then [DONE]. A failure after the first
        chunk is an error event (the status line has gone)."""
        include_usage = bool(stream_options and stream_options.include_usage)
        continuous = bool(stream_options and stream_options.continuous_usage_stats)
        try:
            async for prompt, output in outputs:
                self._note(prompt, output)
                chunk = self._chunk(prompt, output)
                if continuous:
                    chunk["usage"] = self._usage()
                yield _sse(chunk)
            if include_usage:
                yield _sse({**self._head(self._chunk_object()), "choices": [], "usage": self._usage()})
        except HttpStatusError as exc:
            yield _sse(exc.body())
        yield "data: [DONE]\n\n"

    def _note(self, prompt: int, output: RequestOutput) -> None:
        if output.prompt_logprobs is not None:
            self.prompt_lp[prompt] = output.prompt_logprobs
        if output.finished or prompt not in self.prompt_tokens:
            self.prompt_tokens[prompt] = (output.num_prompt_tokens, output.num_cached_tokens)

    def _choice(self, prompt: int, output: RequestOutput) -> tuple[Choice, str]:
        """The output's choice, and the echoed prompt when this is its first output."""
        index = prompt * self.prepared.params.n + output.index
        choice = self.choices.get(index)
        if choice is not None:
            return choice, ""
        choice = self.choices[index] = Choice(index, self.chat, self.prepared.logprobs, self.text)
        if not self.prepared.echo:
            return choice, ""
        ids = self.prepared.prompts[prompt]
        text = self.prepared.prompt_texts[prompt]
        text = text if text is not None else self.tokenizer.decode(ids) if self.tokenizer is not None else ""
        return choice, choice.echo(text, ids, self.prompt_lp.get(prompt))

    def _add(self, prompt: int, output: RequestOutput) -> tuple[Choice, str, dict | None]:
        choice, echoed = self._choice(prompt, output)
        return choice, echoed, choice.add(output)

    def _chunk(self, prompt: int, output: RequestOutput) -> dict:
        choice, echoed, logprobs = self._add(prompt, output)
        first = choice.num_deltas == 1
        entry = {"index": choice.index, "logprobs": logprobs, "finish_reason": choice.finish_reason,
                 "stop_reason": choice.stop_reason}
        if self.chat:
            delta = {"role": "assistant", "content": output.text} if first else {"content": output.text}
            entry["delta"] = delta
        else:
            entry["text"] = echoed + output.text
            if output.prompt_logprobs is not None and self.prepared.report_prompt_logprobs:
                entry["prompt_logprobs"] = prompt_logprobs(self.text, self.prepared.prompts[prompt],
                                                           output.prompt_logprobs)
        return {**self._head(self._chunk_object()), "choices": [entry]}

    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _usage(self) -> dict:
        completion = sum(c.num_tokens for c in self.choices.values())
        prompt = sum(t for t, _ in self.prompt_tokens.values())
        return usage(prompt, completion, sum(c for _, c in self.prompt_tokens.values()))


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream number, item) of every stream as they come; the first failure ends all of them. Leaving early
    (a client gone) closes every stream, which aborts its engine request."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(number: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for item in stream:
                queue.put_nowait((number, item))
            queue.put_nowait((number, _DONE))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait((number, exc))
        finally:
            await stream.aclose()

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            number, item = await queue.get()
            if item is _DONE:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield number, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
