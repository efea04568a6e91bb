"""What a speculative proposer is: it drafts tokens for the step's decoding sequences before the
target's pass and learns how many of them the target accepted after it. The speculator
(speculator.py) drives one, chosen by name from PROPOSERS (registry.py).

A proposer may also offer `propose_on_device(history [R, L], lengths [R], k) -> (drafts [R, k], num_found [R])`,
drafting from token histories on the device (NgramProposer does): with the overlapped loop, the steps it drafts
for are then verified inside the loop (loop.py), and its observe() is not called. It is optional: a proposer
without it drafts through propose() as ever."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from scheduler.config import EngineConfig
    from scheduler.core.kv_cache import BlockPool
    from scheduler.core.scheduler import ScheduledRequest
    from scheduler.sampling.sampler import Sampler
    from scheduler.worker.models import LoadedModel


@dataclass
class Proposal:
    """Drafts for the step's speculating requests, in order. Drafts the host knows are in each
    request's draft_token_ids. device_drafts [R, K], row r for request r, holds drafts the host has
    not learnt yet (draft_token_ids then holds placeholders of the right length): the target's pass
    reads them on the device. draft_probs [R, K, V] is the draft's q where it sampled, None for
    one-hot drafts (greedy drafting, lookups)."""

    device_drafts: torch.Tensor | None = None
    draft_probs: torch.Tensor | None = None


@dataclass
class ProposerContext:
    """What a proposer may build itself from."""

    config: EngineConfig
    target: LoadedModel
    sampler: Sampler
    dtype: torch.dtype
    device: torch.device


class Proposer(Protocol):
    # A model whose KV cache shares the target's block tables (a draft model's config), else None:
    # the memory plan gives each block room for it too.
    kv_model_config: object | None
    # Most positions it can draft at (a draft model's context length), None for no limit.
    max_positions: int | None
    # Whether observe() wants the target's last hidden states at the verified positions
    # (EAGLE-style heads draft from them).
    needs_hidden_states: bool
    # The target layers whose residual streams observe_forward() wants at every token of every target pass
    # (an EAGLE head's features), None for none: the target keeps them only when asked.
    aux_layers: list[int] | None

    @classmethod
    def create(cls, ctx: ProposerContext) -> Proposer:
        """Build from the engine's configuration; ValueError names the option at fault."""

    def prepare(self, num_blocks: int, max_model_len: int) -> None:
        """Once the KV cache's size is known: allocate what depends on it (caches, CUDA graphs)."""

    def propose(self, spec: list[ScheduledRequest], pool: BlockPool) -> Proposal:
        """Draft up to s.num_spec_slots tokens for each s (all decoding, KV slots reserved)."""

    def observe(self, spec: list[ScheduledRequest], num_accepted: list[int],
                hidden_states: torch.Tensor | None) -> None:
        """After verification: num_accepted[r] of spec[r]'s drafts were taken. hidden_states (when
        asked for) are the target's, one row per verified position, spec's requests in order."""

    def observe_forward(self, batch: list[ScheduledRequest], items: list, aux: torch.Tensor,
                        slots: torch.Tensor) -> None:
        """With aux_layers only: after every target pass over items (batch's ForwardItems, in order, before
        the step's tokens are applied), aux [rows, width] holds those layers' streams at each item's every
        new token, in order (a view of a buffer the next pass overwrites), and slots [rows] the KV slot the
        pass wrote each of them to: where the device moved a row on (speculative/loop.py), where it landed."""
