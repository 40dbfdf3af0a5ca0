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

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from llmpipe.models.config import ModelConfig
from llmpipe.models.linear import DenseLinear, Int8Linear

ACTIVATION_FUNCTIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class KVCache:
    """Keys and values for ``batch`` sequences of up to ``max_len`` positions, preallocated."""

    def __init__(self, config: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_len, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, KV, T, hd)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # positions filled so far, the same for every row (lockstep)
        self.start = 0  # positions held by the steering prompt, which a restart keeps

    def reset(self) -> None:
        """Forget everything after the steering prompt."""
        self.length = self.start

    @staticmethod
    def bytes_per_position(config: ModelConfig, dtype: torch.dtype) -> int:
        """Keys and values of one position of one row, all layers."""
        return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype.itemsize


class Transformer:
    """The forward pass over a canonical weight dictionary."""

    def __init__(
        self,
        config: ModelConfig,
        weights: Mapping[str, torch.Tensor],
        dtype: torch.dtype,
        device: str = "cpu",
        load_in_8bit: bool = False,
    ) -> None:
        """Take each weight from ``weights`` (possibly a lazy, memory-mapped mapping) to ``device`` in ``dtype``;
        with ``load_in_8bit`` the blocks' linear layers become int8 (``models.linear.Int8Linear``)."""
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)

        def tensor(name: str) -> torch.Tensor | None:
            return weights[name].to(device=self.device, dtype=dtype) if name in weights else None

        def linear(name: str) -> DenseLinear | Int8Linear | None:
            if f"{name}.weight" not in weights:
                return None
            bias = tensor(f"{name}.bias")
            if load_in_8bit:
                return Int8Linear(weights[f"{name}.weight"].to(dtype), bias, self.device)
            return DenseLinear(tensor(f"{name}.weight"), bias)

        self.embed = tensor("model.embed_tokens.weight")  # (V, C)
        self.positions = tensor("model.embed_positions.weight")  # (P, C) for learned positions
        head = self.embed if config.tie_word_embeddings else tensor("lm_head.weight")
        self.lm_head = DenseLinear(head, None)  # kept in the compute dtype, as transformers does
        self.final_norm = (tensor("model.norm.weight"), tensor("model.norm.bias"))
        self.layers = []
        for i in range(config.num_hidden_layers):
            prefix = f"model.layers.{i}."
            layer: dict = {key: linear(prefix + name) for key, name in _LINEARS.items()}
            for key, name in _NORMS.items():
                layer[key] = tensor(f"{prefix}{name}.weight")
                layer[f"{key}_bias"] = tensor(f"{prefix}{name}.bias")
            self.layers.append(layer)
        self.activation = ACTIVATION_FUNCTIONS[config.activation]
        self._prompt: KVCache | None = None
        if config.positions == "rope":
            half = config.rotary_dim // 2
            inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, half, dtype=torch.float64) / half))
            angles = torch.outer(torch.arange(config.max_position_embeddings, dtype=torch.float64), inv_freq)
            angles = torch.cat([angles, angles], dim=-1)  # (P, rotary_dim)
            self.rope_cos = angles.cos().to(device=self.device, dtype=dtype)
            self.rope_sin = angles.sin().to(device=self.device, dtype=dtype)

    def set_prompt(self, rows: torch.Tensor | None) -> None:
        """Put ``rows`` (P, C) embedding rows before every sequence: their keys and values are computed
        once here and copied into each new cache."""
        self._prompt = None
        if rows is not None:
            self._prompt = KVCache(self.config, 1, len(rows), self.dtype, self.device)
            with torch.inference_mode():
                self._run(rows.to(self.device, self.dtype)[None], self._prompt, logits=False)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """A cache for ``batch`` rows of ``max_len`` positions after the prompt, holding the prompt."""
        held = self._prompt.length if self._prompt else 0
        if held + max_len > self.config.max_position_embeddings:
            raise ValueError(f"{held + max_len} positions exceed the model's {self.config.max_position_embeddings}")
        cache = KVCache(self.config, batch, held + max_len, self.dtype, self.device)
        if self._prompt:
            cache.keys[:, :, :, :held] = self._prompt.keys  # (L, 1, KV, P, hd) broadcast over the rows
            cache.values[:, :, :, :held] = self._prompt.values
            cache.length = cache.start = held
        return cache

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """RMSNorm or LayerNorm, computed in float32 whatever the dtype (as transformers does: a float16
        sum of squares overflows)."""
        h = x.float()
        if self.config.norm == "layer":
            weight, bias = weight.float(), None if bias is None else bias.float()
            return F.layer_norm(h, h.shape[-1:], weight, bias, self.config.norm_eps).to(self.dtype)
        variance = h.pow(2).mean(-1, keepdim=True)
        return weight * (h * torch.rsqrt(variance + self.config.norm_eps)).to(self.dtype)

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
            inner = self.activation(layer["gate"](h)) * layer["up"](h)
        else:
            inner = self.activation(layer["up"](h))
        return layer["down"](inner)

    def prefill(self, tokens: torch.Tensor, cache: KVCache) -> None:
        """Run ``tokens`` (B, T) into ``cache`` only (no logits)."""
        self.forward(tokens, cache, logits=False)

    def forward(self, tokens: torch.Tensor, cache: KVCache, logits: bool = True) -> torch.Tensor:
        """Logits for ``tokens`` (B, T) appended after what ``cache`` holds: (B, T, V) float32 on the CPU."""
        return self._run(F.embedding(tokens.to(self.device), self.embed), cache, logits)

    def logits_of_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) of embedding rows ``x`` (B, T, C) from position 0, without a cache, so autograd
        can differentiate them (training a steering prompt); in the network's dtype and device."""
        return self._run(x, None, logits=True, to_cpu=False)

    def _run(self, x: torch.Tensor, cache: KVCache | None, logits: bool, to_cpu: bool = True) -> torch.Tensor:
        """The network on embedding rows ``x`` (B, T, C) appended after what ``cache`` holds (None: nothing,
        and nothing is kept)."""
        cfg = self.config
        b, t, _ = x.shape
        start = cache.length if cache is not None else 0
        end = start + t
        heads, kv_heads, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        group = heads // kv_heads
        mask = None
        if t > 1:  # causal mask over the new positions; earlier positions are all visible
            mask = torch.ones(t, end, dtype=torch.bool, device=self.device).tril(diagonal=start)  # (T, S)
        if self.positions is not None:
            x = x + self.positions[start:end]
        for i, layer in enumerate(self.layers):
            h = self._norm(x, layer["attn_norm"], layer["attn_norm_bias"])
            q = layer["q"](h).view(b, t, kv_heads, group, hd).permute(0, 2, 3, 1, 4)
            k = layer["k"](h).view(b, t, kv_heads, hd).transpose(1, 2)  # (B, KV, T, hd)
            v = layer["v"](h).view(b, t, kv_heads, hd).transpose(1, 2)
            if cfg.positions == "rope":
                q, k = self._rope(q, start), self._rope(k, start)
            if cache is None:
                keys, values = k, v
            else:
                cache.keys[i, :, :, start:end] = k
                cache.values[i, :, :, start:end] = v
                keys = cache.keys[i, :, :, :end]  # (B, KV, S, hd), a strided view: no copy
                values = cache.values[i, :, :, :end]
            q = q.reshape(b, kv_heads, group * t, hd)  # query heads sharing a KV head
            scores = (q @ keys.transpose(-1, -2)) * (hd**-0.5)  # (B, KV, G*T, S)
            if mask is not None:
                scores = scores.view(b, kv_heads, group, t, end).masked_fill(~mask, float("-inf"))
                scores = scores.view(b, kv_heads, group * t, end)
            attn = scores.softmax(dim=-1, dtype=torch.float32).to(self.dtype) @ values  # (B, KV, G*T, hd)
            attn = attn.view(b, kv_heads, group, t, hd).permute(0, 3, 1, 2, 4).reshape(b, t, heads * hd)  # (B, T, C)
            attn = layer["o"](attn)
            if cfg.parallel_residual:
                x = x + attn + self._mlp(self._norm(x, layer["mlp_norm"], layer["mlp_norm_bias"]), layer)
            else:
                x = x + attn
                x = x + self._mlp(self._norm(x, layer["mlp_norm"], layer["mlp_norm_bias"]), layer)
        if cache is not None:
            cache.length = end
        if not logits:
            return x
        out = self.lm_head(self._norm(x, *self.final_norm))  # (B, T, V)
        return out.to("cpu", torch.float32) if to_cpu else out


_LINEARS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
_NORMS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
