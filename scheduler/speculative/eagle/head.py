"""An EAGLE-3 style draft head for a Llama-family target: one decoder layer that drafts from the
target's own hidden states.

At target position t, the target's residual streams after three of its layers (a low, a middle and
a high one: `layer_ids`) are concatenated and fused (`fc`) into one feature f_t of the hidden size.
The head's row t reads f_t and the embedding of the next token x_{t+1} (the target's embedding
table, borrowed) through one decoder layer whose attention input is [norm(embedding); norm(feature)]
(twice the hidden size); its output, through a final norm and the target's LM head (borrowed),
predicts x_{t+2}. Its KV cache has one layer and row t lives at position t. The k-th draft of a
step (k >= 2) feeds back the head's own output hidden state (before the final norm) in place of a
fused target feature, at the next position: the head is trained that way ("training-time test",
see `unroll`).

The head stores only its own weights; `bind` lends it the target's embedding table and LM head.
Saved heads and their format: scheduler/speculative/eagle/files.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from scheduler.worker.attention import write_kv
from scheduler.worker.models.llama import MLP, Attention, RMSNorm, RotaryEmbedding
from scheduler.worker.parallel import SINGLE

# The target's config fields the head's own layer copies (its dimensions and positions).
CONFIG_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "rms_norm_eps", "rope_parameters", "max_position_embeddings", "vocab_size")


def default_layer_ids(num_layers: int) -> tuple[int, int, int]:
    """A low, a middle and a high layer, as EAGLE-3 picks them (after layers 1, n/2 - 1 and n - 4),
    never the last layer (transformers reports its output after the final norm)."""
    top = max(0, num_layers - 2)
    return tuple(sorted(min(top, max(0, i)) for i in (1, num_layers // 2 - 1, num_layers - 4)))


def head_config(target_config, layer_ids: Sequence[int] | None = None) -> dict:
    """The head's config (a plain dict, saved as JSON) for a target's transformers config."""
    num_layers = target_config.num_hidden_layers
    layer_ids = list(layer_ids if layer_ids is not None else default_layer_ids(num_layers))
    if not layer_ids or not all(0 <= i < num_layers for i in layer_ids):
        raise ValueError(f"layer_ids must be layers of the target's {num_layers}, got {layer_ids}")
    dims = {name: getattr(target_config, name, None) for name in CONFIG_FIELDS}
    dims["head_dim"] = dims["head_dim"] or target_config.hidden_size // target_config.num_attention_heads
    dims["num_key_value_heads"] = dims["num_key_value_heads"] or target_config.num_attention_heads
    return dict(dims, layer_ids=layer_ids, target_num_layers=num_layers)


def _llama_config(config: dict):
    from transformers import LlamaConfig

    dims = {name: config[name] for name in CONFIG_FIELDS if config.get(name) is not None}
    return LlamaConfig(num_hidden_layers=1, attention_bias=False, mlp_bias=False, **dims)


class HeadLayer(nn.Module):
    """The head's decoder layer: attention over [norm(embedding); norm(feature)], the feature as the
    residual, then the MLP."""

    def __init__(self, config):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(hidden, eps)
        self.hidden_norm = RMSNorm(hidden, eps)
        self.self_attn = Attention(config, qk_norm=False, tp=SINGLE)
        attn = self.self_attn
        for name, heads in (("q_proj", attn.num_heads), ("k_proj", attn.num_kv_heads), ("v_proj", attn.num_kv_heads)):
            setattr(attn, name, nn.Linear(2 * hidden, heads * attn.head_dim, bias=False))
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.mlp = MLP(config, SINGLE)

    def attention_input(self, embeds: torch.Tensor, feature: torch.Tensor, ops=None) -> torch.Tensor:
        return torch.cat([_norm(self.input_layernorm, embeds, ops), _norm(self.hidden_norm, feature, ops)], dim=-1)

    def finish(self, attn_out: torch.Tensor, feature: torch.Tensor, ops=None) -> torch.Tensor:
        norm = self.post_attention_layernorm
        if ops is None:
            x = feature + attn_out
            return x + self.mlp(norm(x))
        h, x = ops.add_rms_norm(attn_out, feature, norm.weight, norm.eps)  # the add and the norm in one kernel
        return x + self.mlp.forward_fused(h, ops)


def _norm(norm: RMSNorm, x: torch.Tensor, ops=None) -> torch.Tensor:
    """RMSNorm through the fused kernel where there is one (its pow/mean/rsqrt are one kernel, not five)."""
    return norm(x) if ops is None else ops.add_rms_norm(x, None, norm.weight, norm.eps)[0]


class EagleHead(nn.Module):
    """The head's own weights: fc (3 target hidden states -> hidden), one HeadLayer, the final norm.
    `config` is head_config()'s dict; `bind` lends the target's embedding table and LM head."""

    def __init__(self, config: dict, max_positions: int | None = None):
        super().__init__()
        self.config = dict(config)
        self.layer_ids = list(config["layer_ids"])
        llama = _llama_config(config)
        self.llama_config = llama
        self.hidden_size = llama.hidden_size
        self.fc = nn.Linear(len(self.layer_ids) * llama.hidden_size, llama.hidden_size, bias=False)
        self.midlayer = HeadLayer(llama)
        self.norm = RMSNorm(llama.hidden_size, llama.rms_norm_eps)
        self.rotary = RotaryEmbedding(llama, max_positions or llama.max_position_embeddings)
        self._borrowed: tuple = (None, None, None)  # a tuple: the target's weights never join state_dict()

    @classmethod
    def for_target(cls, target_config, layer_ids: Sequence[int] | None = None,
                   max_positions: int | None = None) -> EagleHead:
        """A freshly initialised head for a target's transformers config."""
        return cls(head_config(target_config, layer_ids), max_positions)

    def bind(self, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor,
             vocab_ids: torch.Tensor | None = None) -> EagleHead:
        """Borrow the target's embedding table [V, H] and LM head [V, H]; with vocab_ids, logits only over
        those tokens (column i stands for vocab_ids[i])."""
        if vocab_ids is not None:
            vocab_ids = vocab_ids.to(device=lm_head_weight.device, dtype=torch.long)
            lm_head_weight = lm_head_weight.detach()[vocab_ids]
        self._borrowed = (embed_weight, lm_head_weight, vocab_ids)
        return self

    @property
    def vocab_ids(self) -> torch.Tensor | None:
        return self._borrowed[2]

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, self._borrowed[0]).to(self.fc.weight.dtype)

    def fuse(self, aux: torch.Tensor) -> torch.Tensor:
        """The target's concatenated hidden states [..., len(layer_ids) * H] -> features [..., H]."""
        return self.fc(aux.to(self.fc.weight.dtype))

    def logits(self, hidden: torch.Tensor, ops=None) -> torch.Tensor:
        """Logits (over vocab_ids when bound with them) from the head's output hidden states."""
        head = self._borrowed[1]
        return F.linear(_norm(self.norm, hidden, ops).to(head.dtype), head)

    def greedy_token_ids(self, hidden: torch.Tensor, ops=None) -> torch.Tensor:
        """The argmax token of each row of output hidden states."""
        return self.token_ids(self.logits(hidden, ops).argmax(dim=-1))

    def token_ids(self, columns: torch.Tensor) -> torch.Tensor:
        """Token ids of logits columns."""
        return columns if self.vocab_ids is None else self.vocab_ids[columns]

    def full_vocab_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary: -inf for tokens a restricted head never proposes."""
        if self.vocab_ids is None:
            return logits
        full = logits.new_full((logits.shape[0], self.config["vocab_size"]), float("-inf"))
        return full.index_copy_(1, self.vocab_ids, logits)

    def forward_paged(self, token_ids, feature, positions, kv_cache, meta, ops=None,
                      rows: torch.Tensor | None = None) -> torch.Tensor:
        """Serving: rows [N] of (next token, feature) at `positions` through the paged KV cache (one
        layer's (k, v)); returns the output hidden states [N, H] (before the final norm), or with `rows`
        (indices) only theirs: every row's keys and values are written, the MLP runs for those rows alone."""
        layer = self.midlayer
        x = layer.attention_input(self.embed(token_ids), feature, ops)
        if ops is None:
            attn = layer.self_attn(x, positions, self.rotary, kv_cache, meta)
        else:
            attn = layer.self_attn.forward_fused(x, positions, self.rotary, kv_cache, meta, ops)
        if rows is not None:
            attn, feature = attn[rows], feature[rows]
        return layer.finish(attn, feature, ops)

    def write_kv(self, token_ids, feature, positions, kv_cache, slot_mapping, ops=None) -> None:
        """Serving: only the keys and values of rows [N] (rows no draft is read from: they are attended to
        later), without their attention or MLP."""
        attn = self.midlayer.self_attn
        x = self.midlayer.attention_input(self.embed(token_ids), feature, ops)
        if hasattr(attn, "qkv_proj"):  # fused projections
            q_size = attn.num_heads * attn.head_dim
            k, v = attn.qkv_proj(x)[:, q_size:].chunk(2, dim=-1)
        else:
            k, v = attn.k_proj(x), attn.v_proj(x)
        k = k.reshape(len(x), attn.num_kv_heads, attn.head_dim)
        v = v.reshape(len(x), attn.num_kv_heads, attn.head_dim)
        k = self.rotary(positions, k, k)[1]
        k_cache, v_cache = kv_cache
        write_kv(k_cache, v_cache, k, v, slot_mapping)

    def unroll(self, input_ids: torch.Tensor, aux: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """Training (dense, full causal attention over each sequence): the head's `steps` draft steps at
        every position, as serving chains them. input_ids [B, T] are the tokens, aux [B, T, 3H] the target's
        concatenated hidden states at them (aux_hidden_states()). Returns, for step s = 0..steps-1, the
        output hidden states [B, T, H]: row i of step s reads token i + 1 + s and predicts token i + 2 + s
        (rows i > T - 3 - s read padding; mask them out of the loss). Step 0 reads the fused target
        features; step s >= 1 reads step s - 1's outputs at position i + s, attending to step 0's keys at
        positions <= i and to the keys of steps 1..s at row i, exactly the KV a serving step holds."""
        batch, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device).expand(batch, length)
        feature = self.fuse(aux)
        keys, values, outputs = [], [], []
        for s in range(steps):
            tokens = F.pad(input_ids[:, 1 + s:], (0, 1 + s))
            feature = self._dense_step(tokens, feature, positions + s, keys, values)
            outputs.append(feature)
        return outputs

    def _dense_step(self, tokens, feature, positions, keys: list, values: list) -> torch.Tensor:
        layer, attn = self.midlayer, self.midlayer.self_attn
        batch, length = tokens.shape
        x = layer.attention_input(self.embed(tokens), feature)
        rows = batch * length
        q = attn.q_proj(x).view(rows, attn.num_heads, attn.head_dim)
        k = attn.k_proj(x).view(rows, attn.num_kv_heads, attn.head_dim)
        v = attn.v_proj(x).view(batch, length, attn.num_kv_heads, attn.head_dim)
        q, k = self.rotary(positions.reshape(rows), q, k)
        q, k = q.view(batch, length, attn.num_heads, -1), k.view(batch, length, attn.num_kv_heads, -1)
        keys.append(k.transpose(1, 2))
        values.append(v.transpose(1, 2))
        mask = _ttt_mask(length, len(keys), tokens.device)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), torch.cat(keys, dim=2), torch.cat(values, dim=2),
                                             attn_mask=mask, scale=attn.scale, enable_gqa=True)
        out = attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
        return layer.finish(out, feature)


def _ttt_mask(length: int, steps: int, device: torch.device) -> torch.Tensor:
    """[length, steps * length]: causal over step 0's keys, the diagonal of every later step's."""
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    diagonal = torch.eye(length, dtype=torch.bool, device=device)
    return torch.cat([causal] + [diagonal] * (steps - 1), dim=1)


def aux_hidden_states(hidden_states: Sequence[torch.Tensor], layer_ids: Sequence[int]) -> torch.Tensor:
    """The head's input from transformers' output_hidden_states=True tuple (embeddings first, so the
    output of layer i is hidden_states[i + 1]): those of layer_ids, concatenated on the last dim."""
    return torch.cat([hidden_states[i + 1] for i in layer_ids], dim=-1)
