"""The engine as the services read it when it runs in a process of its own (--engine-core process): what does not
change, from the core's start (the model's config, the tokenizer, the limits), and the load, from the core's last
message. The edge's work that needs the engine (tokenising, chat templates, grammar checks, the text of requests
without stop strings) runs here."""

from __future__ import annotations

from concurrent.futures import Future

from scheduler import SamplingParams
from scheduler.io.inputs import InputProcessor
from scheduler.io.token_bytes import TokenBytes
from server.core_wire import EngineInfo, Facts


class PoolView:
    """The KV pool's figures, as of the core's last message."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_free_blocks, self.num_used_blocks = num_blocks, 0
        self.prefix_queried_tokens = self.prefix_hit_tokens = 0

    def update(self, facts: Facts) -> None:
        self.num_free_blocks, self.num_used_blocks = facts.kv_blocks_free, facts.kv_blocks_used
        self.prefix_queried_tokens, self.prefix_hit_tokens = facts.prefix_queried_tokens, facts.prefix_hit_tokens


class CoreView:
    """Engine's attributes that the services and the OpenAI API read, in the front end."""

    speculator = None  # the proposer lives in the core: speculative_method names it

    def __init__(self, info: EngineInfo):
        self.config, self.model_config, self.tokenizer = info.config, info.model_config, info.tokenizer
        self.device, self.dtype = info.device, info.dtype
        self.vocab_size, self.max_model_len, self.eos_token_ids = info.vocab_size, info.max_model_len, \
            info.eos_token_ids
        self.speculative_method = info.speculative_method
        self.core_pid = info.pid
        self.inputs = InputProcessor(info.tokenizer, info.vocab_size, info.max_model_len)
        # Read ahead: the text of requests without stop strings is made here (scheduler/io/stream_text.py).
        self.token_bytes = TokenBytes(info.tokenizer, prefetch=True) if info.tokenizer is not None else None
        self.pool = PoolView(info.num_blocks, info.block_size)
        self.facts = Facts(kv_blocks_free=info.num_blocks)
        self.adds_sent = 0  # requests sent to the core (num_waiting counts those it has not taken yet)
        self._grammars = None

    def update(self, facts: Facts) -> None:
        self.facts = facts
        self.pool.update(facts)

    @property
    def kv_capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.pool.block_size

    @property
    def num_running(self) -> int:
        return self.facts.num_running

    @property
    def num_waiting(self) -> int:
        """The core's waiting requests and those on their way to it beyond the running places it had free: a
        request sent to an engine with room starts at once, as one added to an engine in a thread does."""
        facts = self.facts
        on_the_way = self.adds_sent - facts.adds_seen
        free = 0 if facts.num_waiting else max(0, self.config.max_num_seqs - facts.num_running)
        return facts.num_waiting + max(0, on_the_way - free)

    @property
    def num_waiting_prompt_tokens(self) -> int:
        return self.facts.num_waiting_prompt_tokens

    def compile_grammar(self, params: SamplingParams, check: bool = False) -> Future | None:
        """As Engine.compile_grammar, at the edge: a grammar that fails is refused before the request is sent. The
        core compiles it again for its own use (each side caches what it compiled)."""
        so = params.structured_outputs
        if so is None:
            return None
        if self.tokenizer is None:
            raise ValueError(f"structured_outputs.{so.kind}: needs a tokenizer; this model has none")
        if self._grammars is None:
            from scheduler.structured.compiler import GrammarCompiler

            self._grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids)
        if check:
            self._grammars.check(so)
        return self._grammars.submit(so)
