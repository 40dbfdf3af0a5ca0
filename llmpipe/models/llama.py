"""A compact Llama-family decoder (SmolLM2, OpenLLaMA) written for coding, not training.

Why not ``transformers``' model: the coder calls the network once per token
for a whole batch of chunks in lockstep, and needs a preallocated KV cache
(transformers' dynamic cache concatenates on every step, quadratic in the
chunk length) and full control of every operation, which later becomes the
exact-arithmetic engine. Weight names follow the Hugging Face checkpoints so a
converted ``state_dict`` loads unchanged. ``tests/models/test_llama.py``
checks the logits against ``transformers.LlamaForCausalLM``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, hf: dict) -> LlamaConfig:
        """Read a Hugging Face ``config.json`` dictionary (transformers 4 or 5 spelling)."""
        rope = hf.get("rope_parameters") or {}
        heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=float(hf["rms_norm_eps"]),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            max_position_embeddings=hf["max_position_embeddings"],
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )

    def to_dict(self) -> dict:
        return asdict(self)


class KVCache:
    """Keys and values for ``batch`` sequences of up to ``max_len`` positions, preallocated."""

    def __init__(self, config: LlamaConfig, batch: int, max_len: int, dtype: torch.dtype) -> None:
        shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_len, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype)  # (L, B, KV, T, hd)
        self.values = torch.zeros(shape, dtype=dtype)
        self.length = 0  # positions filled so far, the same for every row (lockstep)


class Llama:
    """Llama forward pass over a weight dictionary with Hugging Face names."""

    def __init__(self, config: LlamaConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        self.config = config
        self.dtype = dtype
        w = {name: t.to(dtype) for name, t in weights.items()}
        self.embed = w["model.embed_tokens.weight"]  # (V, C)
        self.lm_head = self.embed if config.tie_word_embeddings else w["lm_head.weight"]
        self.final_norm = w["model.norm.weight"]
        self.layers = [
            {key: w[f"model.layers.{i}.{name}"] for key, name in _LAYER_WEIGHTS.items()}
            for i in range(config.num_hidden_layers)
        ]
        half = config.head_dim // 2
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, half, dtype=torch.float64) / half))
        angles = torch.outer(torch.arange(config.max_position_embeddings, dtype=torch.float64), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)  # (P, hd)
        self.rope_cos = angles.cos().to(dtype)
        self.rope_sin = angles.sin().to(dtype)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        if max_len > self.config.max_position_embeddings:
            raise ValueError(f"{max_len} positions exceed the model's {self.config.max_position_embeddings}")
        return KVCache(self.config, batch, max_len, self.dtype)

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(variance + self.config.rms_norm_eps) * weight

    def _rope(self, x: torch.Tensor, start: int) -> torch.Tensor:
        t = x.shape[-2]
        cos = self.rope_cos[start : start + t]  # (T, hd)
        sin = self.rope_sin[start : start + t]
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

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
        for i, layer in enumerate(self.layers):
            h = self._rms_norm(x, layer["attn_norm"])
            q = F.linear(h, layer["q"]).view(b, t, kv_heads, group, hd).permute(0, 2, 3, 1, 4)  # (B, KV, G, T, hd)
            k = F.linear(h, layer["k"]).view(b, t, kv_heads, hd).transpose(1, 2)  # (B, KV, T, hd)
            v = F.linear(h, layer["v"]).view(b, t, kv_heads, hd).transpose(1, 2)
            cache.keys[i, :, :, start:end] = self._rope(k, start)
            cache.values[i, :, :, start:end] = v
            keys = cache.keys[i, :, :, :end]  # (B, KV, S, hd), a strided view: no copy
            values = cache.values[i, :, :, :end]
            q = self._rope(q, start).reshape(b, kv_heads, group * t, hd)  # query heads sharing a KV head
            scores = (q @ keys.transpose(-1, -2)) * (hd**-0.5)  # (B, KV, G*T, S)
            if mask is not None:
                scores = scores.view(b, kv_heads, group, t, end).masked_fill(~mask, float("-inf"))
                scores = scores.view(b, kv_heads, group * t, end)
            attn = scores.softmax(dim=-1) @ values  # (B, KV, G*T, hd)
            attn = attn.view(b, kv_heads, group, t, hd).permute(0, 3, 1, 2, 4).reshape(b, t, heads * hd)  # (B, T, C)
            x = x + F.linear(attn, layer["o"])
            h = self._rms_norm(x, layer["mlp_norm"])
            x = x + F.linear(F.silu(F.linear(h, layer["gate"])) * F.linear(h, layer["up"]), layer["down"])
        cache.length = end
        if not logits:
            return x
        return F.linear(self._rms_norm(x, self.final_norm), self.lm_head)  # (B, T, V)


_LAYER_WEIGHTS = {
    "attn_norm": "input_layernorm.weight",
    "q": "self_attn.q_proj.weight",
    "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "gate": "mlp.gate_proj.weight",
    "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight",
}
