"""Engine outputs as the OpenAI API's JSON: a choice per completion of each prompt, whole or as stream chunks, with
logprobs in the completions API's form (tokens, token_logprobs, top_logprobs, text_offset) or chat's, vLLM's
prompt_logprobs, and usage."""

from __future__ import annotations

from scheduler.core.outputs import RequestOutput, TokenLogprob


class TokenText:
    """Each token's own text, as logprobs show it (or `token_id:N`, vLLM's return_tokens_as_token_ids)."""

    def __init__(self, tokenizer, as_ids: bool):
        self.tokenizer, self.as_ids = tokenizer, as_ids or tokenizer is None

    def __call__(self, token_id: int) -> str:
        return f"token_id:{token_id}" if self.as_ids else self.tokenizer.decode([token_id])

    def top(self, lp: TokenLogprob, k: int) -> dict[str, float]:
        """The completions API's top_logprobs entry: the k best and the chosen token."""
        top = {self(t): v for t, v in lp.top[:k]}
        top.setdefault(self(lp.token_id), lp.logprob)
        return top


class Choice:
    """One completion (of one prompt) as it comes out of the engine, delta by delta."""

    def __init__(self, index: int, chat: bool, logprobs: int | None, text: TokenText):
        self.index, self.chat, self.k, self.text = index, chat, logprobs, text
        self.content = ""
        self.lp = _LegacyLogprobs(text, logprobs or 0) if logprobs is not None and not chat else None
        self.chat_lp: list[dict] = []
        self.finish_reason = self.stop_reason = None
        self.num_tokens = 0
        self.num_deltas = 0

    def echo(self, prompt_text: str, prompt_ids: list[int], prompt_logprobs: list | None) -> str:
        """Starts the completion with its prompt (completions' echo)."""
        self.content += prompt_text
        if self.lp is not None:
            self.lp.add_prompt(prompt_ids, prompt_logprobs)
        return prompt_text

    def add(self, output: RequestOutput) -> dict:
        """Take a delta; its logprobs in this API's form (None when none were asked)."""
        self.content += output.text
        self.num_tokens += len(output.token_ids)
        self.num_deltas += 1
        if output.finished:
            self.finish_reason, self.stop_reason = output.finish_reason, output.stop_reason
        if self.k is None:
            return None
        if self.chat:
            entries = [self._chat_entry(lp) for lp in output.logprobs or ()]
            self.chat_lp += entries
            return {"content": entries}
        return self.lp.add(output.logprobs or ())  # with the echoed prompt's, the first time

    def _chat_entry(self, lp: TokenLogprob) -> dict:
        token = self.text(lp.token_id)
        return {"token": token, "logprob": lp.logprob, "bytes": list(token.encode()),
                "top_logprobs": [{"token": (s := self.text(t)), "logprob": v, "bytes": list(s.encode())}
                                 for t, v in lp.top[:self.k]]}

    def whole(self) -> dict:
        """The choice of a unary answer."""
        choice = {"index": self.index, "finish_reason": self.finish_reason, "stop_reason": self.stop_reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": self.content}
            choice["logprobs"] = {"content": self.chat_lp} if self.k is not None else None
        else:
            choice["text"] = self.content
            choice["logprobs"] = self.lp.whole() if self.lp is not None else None
        return choice


class _LegacyLogprobs:
    """The completions API's logprobs; text_offset counts from the start of the choice's text."""

    def __init__(self, text: TokenText, k: int):
        self.text, self.k = text, k
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []
        self.offset = 0
        self.reported = 0  # entries handed out so far (as stream chunks)

    def add_prompt(self, prompt_ids: list[int], entries: list | None) -> None:
        entries = entries if entries is not None else [None] * len(prompt_ids)
        for token_id, lp in zip(prompt_ids, entries):
            if lp is None:
                self._append(token_id, None, None)
            else:
                self._append(token_id, lp.logprob, self.text.top(lp, self.k))

    def add(self, logprobs: list[TokenLogprob]) -> dict:
        """Take a delta's logprobs; the entries not handed out yet."""
        for lp in logprobs:
            self._append(lp.token_id, lp.logprob, self.text.top(lp, self.k))
        start, self.reported = self.reported, len(self.tokens)
        return self._since(start)

    def whole(self) -> dict:
        return self._since(0)

    def _append(self, token_id: int, logprob: float | None, top: dict | None) -> None:
        token = self.text(token_id)
        self.tokens.append(token)
        self.token_logprobs.append(logprob)
        self.top_logprobs.append(top)
        self.text_offset.append(self.offset)
        self.offset += len(token)

    def _since(self, start: int) -> dict:
        return {"tokens": self.tokens[start:], "token_logprobs": self.token_logprobs[start:],
                "top_logprobs": self.top_logprobs[start:], "text_offset": self.text_offset[start:]}


def prompt_logprobs(text: TokenText, prompt_ids: list[int], entries: list | None) -> list | None:
    """vLLM's prompt_logprobs: per prompt token, None for the first, else {token id: {logprob, rank,
    decoded_token}} for the token itself and the best alternatives (rank known for those)."""
    if entries is None:
        return None
    out = []
    for token_id, lp in zip(prompt_ids, entries):
        if lp is None:
            out.append(None)
            continue
        ranks = {t: rank for rank, (t, _) in enumerate(lp.top, 1)}
        values = {token_id: lp.logprob, **dict(lp.top)}
        out.append({str(t): {"logprob": v, "rank": ranks.get(t), "decoded_token": text(t)} for t, v in values.items()})
    return out


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}
