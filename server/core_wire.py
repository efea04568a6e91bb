"""What passes between the daemon's front end and an engine core in a process of its own (--engine-core process):
the engine's facts at start, a step's outputs packed small, and the load figures the services read.

A step's outputs go as one pickled message. Most outputs are a step's new tokens alone (and their text); those go
as plain tuples, ~0.3 us to pack and ~0.6 to rebuild a token, where pickling the RequestOutput objects costs ~3.
Any other output (logprobs, the last one, an error) goes as the object itself."""

from __future__ import annotations

from dataclasses import dataclass

from scheduler.core.outputs import RequestOutput

_new = object.__new__


def pack_outputs(outputs: list[RequestOutput]) -> list:
    """A step's outputs for the wire, in order."""
    packed = []
    for o in outputs:
        if _plain(o):
            packed.append((o.request_id, o.token_ids, o.text, o.num_prompt_tokens, o.num_output_tokens,
                           o.num_cached_tokens, o.index))
        else:
            packed.append(o)
    return packed


def unpack_outputs(packed: list) -> list[RequestOutput]:
    """pack_outputs' outputs back, in order."""
    outputs = []
    for item in packed:
        if type(item) is tuple:
            # Built without __init__ (as scheduler.core.outputs.token_output): the rest are the class defaults.
            o = _new(RequestOutput)
            (o.request_id, o.token_ids, o.text, o.num_prompt_tokens, o.num_output_tokens, o.num_cached_tokens,
             o.index) = item
            outputs.append(o)
        else:
            outputs.append(item)
    return outputs


def _plain(o: RequestOutput) -> bool:
    return not o.finished and o.error is None and o.logprobs is None and o.prompt_logprobs is None \
        and o.stop_reason is None and o.metrics is None and not o.held_back_bytes


@dataclass
class Facts:
    """The core's load after a step (or a turn with nothing to run): what GetLoad, GetLoads and the queue limit
    read. adds_seen counts the requests the core has taken in, so the front end adds those still on their way."""

    num_running: int = 0
    num_waiting: int = 0
    num_waiting_prompt_tokens: int = 0
    kv_blocks_free: int = 0
    kv_blocks_used: int = 0
    prefix_queried_tokens: int = 0
    prefix_hit_tokens: int = 0
    adds_seen: int = 0


def engine_facts(engine, adds_seen: int) -> Facts:
    pool = engine.pool
    return Facts(engine.num_running, engine.num_waiting, engine.num_waiting_prompt_tokens, pool.num_free_blocks,
                 pool.num_used_blocks, pool.prefix_queried_tokens, pool.prefix_hit_tokens, adds_seen)


@dataclass
class EngineInfo:
    """What the front end needs of the engine that does not change once it is built (the tokenizer included:
    tokenising, chat templates and grammar checks stay in the front end)."""

    config: object  # the engine's resolved EngineConfig
    model_config: object
    tokenizer: object
    device: str
    dtype: str
    vocab_size: int
    max_model_len: int
    eos_token_ids: tuple
    num_blocks: int
    block_size: int
    speculative_method: str  # what --speculative best chose; "off" without speculation
    pid: int


def engine_info(engine, pid: int) -> EngineInfo:
    from scheduler.speculative.registry import method_of

    method = method_of(engine.speculator.proposer) if engine.speculator else "off"
    return EngineInfo(engine.config, engine.model_config, engine.tokenizer, str(engine.device), str(engine.dtype),
                      engine.vocab_size, engine.max_model_len, tuple(engine.eos_token_ids), engine.pool.num_blocks,
                      engine.pool.block_size, method, pid)
