"""A compact decoder-only transformer (Llama, GPT-NeoX, GPT-2) written for coding, not training.

Why not ``transformers``' models: the coder calls the network once per token
for a whole batch of chunks in lockstep, and needs a preallocated KV cache
(transformers' dynamic cache concatenates on every step, quadratic in the
chunk length) and full control of every operation, which the exact engine
(``llmpipe.engine.exact_transformer``) mirrors step by step. Weights use the
canonical names of ``llmpipe.models.convert``; ``tests/models/test_transformer.py``
checks the logits against ``transformers`` for each architecture.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmpipe.models.config import ModelConfig

ACTIVATION_FUNCTIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class KVCache:
    """Keys and values for ``batch`` sequences of up to ``max_len`` positions, preallocated."""

    def __init__(self, config: ModelConfig, batch: int, max_len: int, dtype: torch.dtype) -> None:
        shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_len, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype)  # (L, B, KV, T, hd)
        self.values = torch.zeros(shape, dtype=dtype)
        self.length = 0  # positions filled so far, the same for every row (lockstep)


class Transformer:
    """The forward pass over a canonical weight dictionary."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        self.config = config
        self.dtype = dtype
        w = {name: t.to(dtype) for name, t in weights.items()}
        self.embed = w["model.embed_tokens.weight"]  # (V, C)
        self.positions = w.get("model.embed_positions.weight")  # (P, C) for learned positions
        self.lm_head = self.embed if config.tie_word_embeddings else w["lm_head.weight"]
        self.final_norm = (w["model.norm.weight"], w.get("model.norm.bias"))
        self.layers = []
        for i in range(config.num_hidden_layers):
            prefix = f"model.layers.{i}."
            self.layers.append({key: w.get(prefix + name) for key, name in _LAYER_WEIGHTS.items()})
        self.activation = ACTIVATION_FUNCTIONS[config.activation]
        if config.positions == "rope":
            half = config.rotary_dim // 2
            inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, half, dtype=torch.float64) / half))
            angles = torch.outer(torch.arange(config.max_position_embeddings, dtype=torch.float64), inv_freq)
            angles = torch.cat([angles, angles], dim=-1)  # (P, rotary_dim)
            self.rope_cos = angles.cos().to(dtype)
            self.rope_sin = angles.sin().to(dtype)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        if max_len > self.config.max_position_embeddings:
            raise ValueError(f"{max_len} positions exceed the model's {self.config.max_position_embeddings}")
        return KVCache(self.config, batch, max_len, self.dtype)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.config.norm == "layer":
            return F.layer_norm(x, x.shape[-1:], weight, bias, self.config.norm_eps)
        variance = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(variance + self.config.norm_eps) * weight

    def _rope(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Rotate the first ``rotary_dim`` dimensions of each head (all of them for Llama)."""
        t, dim = x.shape[-2], self.config.rotary_dim
        cos = self.rope_cos[start : start + t]  # (T, rotary_dim)
        sin = self.rope_sin[start : start + t]
        part = x[..., :dim]  # all of x for Llama
        rotated = torch.cat([-part[..., dim // 2 :], part[..., : dim // 2]], dim=-1)
        turned = part * cos + rotated * sin
        return turned if dim == x.shape[-1] else torch.cat([turned, x[..., dim:]], dim=-1)

    def _mlp(self, h: torch.Tensor, layer: dict) -> torch.Tensor:
        if self.config.gated_mlp:
            gate = F.linear(h, layer["gate"], layer["gate_bias"])
            inner = self.activation(gate) * F.linear(h, layer["up"], layer["up_bias"])
        else:
            inner = self.activation(F.linear(h, layer["up"], layer["up_bias"]))
        return F.linear(inner, layer["down"], layer["down_bias"])

    def prefill(self, tokens: torch.Tensor, cache: KVCache) -> None:
        """Run ``tokens`` (B, T) into ``cache`` only (no logits)."""
        self.forward(tokens, cache, logits=False)

    def forward(self, tokens: torch.Tensor, cache: KVCache, logits: bool = True) -> torch.Tensor:
        """Logits for ``tokens`` (B, T) appended after what ``cache`` holds; returns (B, T, V)."""
        cfg = self.config
        b, t = tokens.shape
        start = cache.length
        end = start + t
        heads, kv_heads, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        group = heads // kv_heads
        mask = None
        if t > 1:  # causal mask over the new positions; earlier positions are all visible
            mask = torch.ones(t, end, dtype=torch.bool).tril(diagonal=start)  # (T, S)
        x = F.embedding(tokens, self.embed)  # (B, T, C)
        if self.positions is not None:
            x = x + self.positions[start:end]
        for i, layer in enumerate(self.layers):
            h = self._norm(x, layer["attn_norm"], layer["attn_norm_bias"])
            q = F.linear(h, layer["q"], layer["q_bias"]).view(b, t, kv_heads, group, hd).permute(0, 2, 3, 1, 4)
            k = F.linear(h, layer["k"], layer["k_bias"]).view(b, t, kv_heads, hd).transpose(1, 2)  # (B, KV, T, hd)
            v = F.linear(h, layer["v"], layer["v_bias"]).view(b, t, kv_heads, hd).transpose(1, 2)
            if cfg.positions == "rope":
                q, k = self._rope(q, start), self._rope(k, start)
            cache.keys[i, :, :, start:end] = k
            cache.values[i, :, :, start:end] = v
            keys = cache.keys[i, :, :, :end]  # (B, KV, S, hd), a strided view: no copy
            values = cache.values[i, :, :, :end]
            q = q.reshape(b, kv_heads, group * t, hd)  # query heads sharing a KV head
            scores = (q @ keys.transpose(-1, -2)) * (hd**-0.5)  # (B, KV, G*T, S)
            if mask is not None:
                scores = scores.view(b, kv_heads, group, t, end).masked_fill(~mask, float("-inf"))
                scores = scores.view(b, kv_heads, group * t, end)
            attn = scores.softmax(dim=-1) @ values  # (B, KV, G*T, hd)
            attn = attn.view(b, kv_heads, group, t, hd).permute(0, 3, 1, 2, 4).reshape(b, t, heads * hd)  # (B, T, C)
            attn = F.linear(attn, layer["o"], layer["o_bias"])
            if cfg.parallel_residual:
                x = x + attn + self._mlp(self._norm(x, layer["mlp_norm"], layer["mlp_norm_bias"]), layer)
            else:
                x = x + attn
                x = x + self._mlp(self._norm(x, layer["mlp_norm"], layer["mlp_norm_bias"]), layer)
        cache.length = end
        if not logits:
            return x
        return F.linear(self._norm(x, *self.final_norm), self.lm_head)  # (B, T, V)


_LAYER_WEIGHTS = {
    "attn_norm": "input_layernorm.weight",
    "attn_norm_bias": "input_layernorm.bias",
    "q": "self_attn.q_proj.weight",
    "q_bias": "self_attn.q_proj.bias",
    "k": "self_attn.k_proj.weight",
    "k_bias": "self_attn.k_proj.bias",
    "v": "self_attn.v_proj.weight",
    "v_bias": "self_attn.v_proj.bias",
    "o": "self_attn.o_proj.weight",
    "o_bias": "self_attn.o_proj.bias",
    "mlp_norm": "post_attention_layernorm.weight",
    "mlp_norm_bias": "post_attention_layernorm.bias",
    "gate": "mlp.gate_proj.weight",
    "gate_bias": "mlp.gate_proj.bias",
    "up": "mlp.up_proj.weight",
    "up_bias": "mlp.up_proj.bias",
    "down": "mlp.down_proj.weight",
    "down_bias": "mlp.down_proj.bias",
}
