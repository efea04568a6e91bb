"""Text made where a request's outputs are read, at the reader's cadence, not in the engine's step for every token.

A request whose text decides nothing in the engine (it has no stop strings: EOS, stop tokens, the length cap and
grammars all work on token ids) runs there without a detokenizer (`Engine.add_request(detokenize=False)`), so its
rows take the step's array path. Whoever reads its stream makes the text from all the tokens it takes at once: the
daemon's call when it builds a message (after joining what waited), `LLM.generate` once at the end. Each read costs
one window decode (IncrementalDetokenizer.add_tokens), however many tokens it carries. The text is the same as the
engine would have made: the concatenated deltas are tokenizer.decode of the output (with a few prompt tokens as
context), a character cut at the end of a read waits for the next, and the last read hands out all but the bytes of
a character never finished (held_back_bytes). A request with stop strings keeps its text from the engine, made
token by token where they are matched."""

from __future__ import annotations

from scheduler.core.outputs import RequestOutput
from scheduler.core.params import SamplingParams
from scheduler.io.detokenizer import IncrementalDetokenizer
from scheduler.io.token_bytes import TokenBytes


def made_by_reader(params: SamplingParams, tokenizer) -> bool:
    """Whether a request's text may be made where it is read: there is a tokenizer, and no stop string needs the
    text in the engine."""
    return tokenizer is not None and not params.stop


class StreamText:
    """The text of one request's outputs (all n completions), filled in as they are read, in order."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams,
                 token_bytes: TokenBytes | None):
        """prompt_token_ids: the prompt as the engine runs it (after truncate_prompt_tokens)."""
        assert not params.stop, "text that stop strings are matched in is made in the engine"
        self._tokenizer, self._prompt, self._params, self._token_bytes = tokenizer, prompt_token_ids, params, \
            token_bytes
        self._completions: dict[int, IncrementalDetokenizer] = {}

    def fill(self, output: RequestOutput) -> RequestOutput:
        """Set the output's text (and, on its completion's last, held_back_bytes) from its new tokens; an output
        carrying an error is left as it is. Returns the output."""
        if output.error is not None:
            return output
        detokenizer = self._completions.get(output.index)
        if detokenizer is None:
            detokenizer = self._completions[output.index] = IncrementalDetokenizer(
                self._tokenizer, self._prompt, self._params, self._token_bytes)
        if output.token_ids:
            detokenizer.add_tokens(output.token_ids, output.num_output_tokens)
        output.text = detokenizer.take_delta(output.finished)
        output.held_back_bytes = detokenizer.held_back_bytes
        return output


def stream_text(engine, prompt_token_ids: list[int], params: SamplingParams) -> StreamText:
    """A StreamText for a request the engine (Engine, or the daemon's view of a core in another process: its
    tokenizer, inputs and token_bytes) runs without text."""
    return StreamText(engine.tokenizer, engine.inputs.truncate(prompt_token_ids, params), params, engine.token_bytes)
