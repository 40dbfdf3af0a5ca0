"""The Llama forward pass in exact arithmetic: the same bits on every machine.

The recipe (``FORMAT.md``, "Exact numerics v1", is the normative text):

- weights int8, one scale per output channel; each RMSNorm gain is folded
  into the weights of the matmuls it feeds before quantisation;
- activations int16 per token (``quantize_rows``) before every matmul, which
  runs as two exact int8 products (``integer_ops``); the RMSNorm statistic is
  the integer sum of squares of that same quantised row (< C * 2^30, exact in
  float64 for C < 2^23);
- RoPE from ``tables.rope_tables``; keys and values int8 per token and head;
- attention scores: int16 queries (split in bytes) against int8 keys in float32
  GEMMs, exact since 128 * 127 * head_dim < 2^24 for head_dim <= 1032;
- softmax: exp from a table on a 1/64 grid scaled to 2^15 (``tables.exp_table``),
  denominator an integer sum in float64 (exact below 2^53);
- attention-weighted values: weights requantised to integers ``w_t`` with
  ``sum_t w_t <= 2^15 + T/2`` against a common value scale (the running
  maximum of the value scales), so ``sum_t |w_t v_t| <= 127 (2^15 + T/2) < 2^24``
  for T < 198,000: a float32 GEMM is exact;
- SiLU from a table on a 1/256 grid; the final logits are float32 products of
  an exact int64 matmul result with two scales.

Every reduction is exact and every other step is an elementwise IEEE
operation, so a position gets identical logits whether it is computed in a
full-sequence pass (the encoder) or one step at a time through the KV cache
(the decoder), alone or in any batch, with any number of threads.
"""

from __future__ import annotations

import math

import torch

from llmpipe.engine import tables
from llmpipe.engine.integer_ops import (
    ACT_MAX,
    int16_int8_matmul,
    lookup,
    quantize_rows,
    quantize_weight,
    split_bytes,
)
from llmpipe.models.llama import LlamaConfig

NUMERICS_VERSION = 1
KV_MAX = 127
ATTENTION_GRID = 64  # softmax exponent resolution inside attention: 1/64
ATTENTION_ONE = 1 << 15  # attention weights are fixed point with this unit
QUERY_BLOCK = 64  # full-sequence attention handles this many query positions at a time (memory only)


class ExactWeight:
    """An int8 weight stored transposed for ``int16_int8_matmul``, with its per-channel scales."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        self.q_t = q.t().contiguous()  # (K, N) int8
        self.scale = scale.to(torch.float32)  # (N,)

    def __call__(self, xq: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
        """``(M, K)`` quantised rows with ``(M, 1)`` scales -> float32 ``(M, N)``."""
        high, low = int16_int8_matmul(xq, self.q_t)  # (M, N) int32 each, exact
        # 256 * high is exact in float32; the sum is the one rounding; then the two scales
        return (high.to(torch.float32).mul_(256.0).add_(low.to(torch.float32))).mul_(row_scale).mul_(self.scale)


def prepare_exact_weights(config: LlamaConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold norms into the matmuls after them and quantise: the tensors the exact engine runs on.

    Deterministic (max, elementwise IEEE products and rounding only), so any
    machine derives the same int8 weights from the same float weights.
    """
    out: dict[str, torch.Tensor] = {}

    def put(name: str, weight: torch.Tensor, gain: torch.Tensor | None = None) -> None:
        weight = weight.to(torch.float32)
        if gain is not None:
            weight = weight * gain.to(torch.float32)[None, :]
        q, scale = quantize_weight(weight)
        out[f"{name}.q"], out[f"{name}.scale"] = q, scale

    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        attn_gain = weights[p + "input_layernorm.weight"]
        mlp_gain = weights[p + "post_attention_layernorm.weight"]
        qkv = torch.cat([weights[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        put(f"{i}.qkv", qkv, attn_gain)
        put(f"{i}.o", weights[p + "self_attn.o_proj.weight"])
        gate_up = torch.cat([weights[p + "mlp.gate_proj.weight"], weights[p + "mlp.up_proj.weight"]])
        put(f"{i}.gate_up", gate_up, mlp_gain)
        put(f"{i}.down", weights[p + "mlp.down_proj.weight"])
    embed = weights["model.embed_tokens.weight"]
    head = embed if config.tie_word_embeddings else weights["lm_head.weight"]
    put("lm_head", head, weights["model.norm.weight"])
    out["embed"] = embed.to(torch.float32).contiguous()
    return out


class ExactKVCache:
    """int8-valued keys and values (held in float32 for the GEMMs) with per-token scales."""

    def __init__(self, config: LlamaConfig, batch: int, max_len: int) -> None:
        shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_len)
        self.keys = torch.zeros(*shape, config.head_dim)  # (L, B, KV, T, hd)
        self.values = torch.zeros(*shape, config.head_dim)
        self.key_scales = torch.zeros(shape)  # (L, B, KV, T)
        self.value_scales = torch.zeros(shape)
        self.length = 0

    @staticmethod
    def bytes_per_position(config: LlamaConfig) -> int:
        return 2 * config.num_hidden_layers * config.num_key_value_heads * (config.head_dim + 1) * 4


def _norm_quantize(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm (its gain is in the next weights) fused with the int16 quantisation for the next matmul.

    ``x / rms(x)`` quantised per row is ``x`` quantised per row with a
    different scale, so only the scale carries the norm:
    ``rms^2 = scale^2 * sum(q^2) / C + eps`` with the exact integer sum.
    """
    q, scale = quantize_rows(x, ACT_MAX)
    scale64 = scale.to(torch.float64)
    squares = (q.to(torch.float64) ** 2).sum(dim=-1, keepdim=True)  # integers < C * 2^30: exact
    mean_square = squares * scale64 * scale64 * (1.0 / x.shape[-1]) + eps
    inverse_rms = torch.reciprocal(torch.sqrt(mean_square))
    return q, (scale64 * inverse_rms).to(torch.float32)


class ExactLlama:
    """A Llama model on prepared exact weights; see the module docstring for the arithmetic."""

    def __init__(self, config: LlamaConfig, exact_weights: dict[str, torch.Tensor]) -> None:
        self.config = config
        w = exact_weights

        def weight(name: str) -> ExactWeight:
            return ExactWeight(w[f"{name}.q"], w[f"{name}.scale"])

        self.embed = w["embed"]
        self.layers = [
            {part: weight(f"{i}.{part}") for part in ("qkv", "o", "gate_up", "down")}
            for i in range(config.num_hidden_layers)
        ]
        self.lm_head = weight("lm_head")
        cos, sin = tables.rope_tables(config.rope_theta, config.head_dim, config.max_position_embeddings)
        self.rope_cos, self.rope_sin = torch.from_numpy(cos), torch.from_numpy(sin)
        self.attention_exp = torch.from_numpy(tables.exp_table(ATTENTION_GRID, 15)).to(torch.float32)  # exact
        silu = tables.silu_table()
        self.silu = torch.from_numpy(silu)
        self.silu_limit = (len(silu) - 1) // 2
        # IEEE sqrt and division are correctly rounded: the same float everywhere; times the grid (a power of two)
        self.score_factor = torch.tensor(ATTENTION_GRID / math.sqrt(config.head_dim), dtype=torch.float32)

    def new_cache(self, batch: int, max_len: int) -> ExactKVCache:
        return ExactKVCache(self.config, batch, max_len)

    def _rope(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """x: (B, T, heads, hd) float32."""
        t = x.shape[1]
        cos = self.rope_cos[start : start + t, None, :]  # (T, 1, hd)
        sin = self.rope_sin[start : start + t, None, :]
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def _silu(self, g: torch.Tensor) -> torch.Tensor:
        limit = self.silu_limit
        steps = torch.round(g * float(tables.SILU_GRID))
        table = lookup(self.silu, steps.clamp(-limit, limit).add_(limit))
        return torch.where(steps >= limit, g, torch.where(steps <= -limit, 0.0, table))

    def _attention(self, q, k, v, cache: ExactKVCache, layer: int, start: int) -> torch.Tensor:
        """q: (B, T, H, hd), k and v: (B, T, KV, hd) float32 -> (B, T, H * hd)."""
        cfg = self.config
        b, t, heads, hd = q.shape
        kv_heads = cfg.num_key_value_heads
        group = heads // kv_heads
        end = start + t
        kq, ks = quantize_rows(k, KV_MAX)  # per token and head
        vq, vs = quantize_rows(v, KV_MAX)
        cache.keys[layer, :b, :, start:end] = kq.transpose(1, 2)
        cache.values[layer, :b, :, start:end] = vq.transpose(1, 2)
        cache.key_scales[layer, :b, :, start:end] = ks[..., 0].transpose(1, 2)
        cache.value_scales[layer, :b, :, start:end] = vs[..., 0].transpose(1, 2)
        keys = cache.keys[layer, :b, :, :end]  # (B, KV, S, hd)
        values = cache.values[layer, :b, :, :end]
        key_scales = cache.key_scales[layer, :b, :, None, :end]  # (B, KV, 1, S)
        value_scales = cache.value_scales[layer, :b, :, :end]  # (B, KV, S)
        running_max = value_scales.cummax(dim=-1).values  # common value scale per query position

        qq, qs = quantize_rows(q, ACT_MAX)  # (B, T, H, hd), (B, T, H, 1)
        qq = qq.view(b, t, kv_heads, group, hd).permute(0, 2, 3, 1, 4)  # (B, KV, G, T, hd)
        qs = qs.view(b, t, kv_heads, group, 1).permute(0, 2, 3, 1, 4) * self.score_factor  # includes x64
        out = torch.empty(b, kv_heads, group, t, hd)
        for a in range(0, t, QUERY_BLOCK):  # query blocks only bound memory; each position is independent
            n = min(QUERY_BLOCK, t - a)
            visible = start + a + n  # keys a query in this block may see, at most
            both = split_bytes(qq[:, :, :, a : a + n].reshape(b * kv_heads, group * n, hd), dim=1)
            keys_t = keys[:, :, :visible].reshape(b * kv_heads, visible, hd).transpose(1, 2)
            raw = torch.matmul(both, keys_t)  # exact integers (bound in module docstring)
            dots = raw[:, : group * n] * 256.0 + raw[:, group * n :]  # one rounding: the sum
            dots = dots.view(b, kv_heads, group, n, visible)
            # scores in units of 1/ATTENTION_GRID (a power of two, folded into the query scale: exact)
            scores = dots * qs[:, :, :, a : a + n] * key_scales[..., :visible].unsqueeze(2)
            if t > 1:  # positions after each query are invisible
                rows = torch.arange(start + a, start + a + n)[:, None]
                hidden = torch.arange(visible)[None, :] > rows  # (n, visible)
                scores = scores.masked_fill_(hidden, float("-inf"))
            top = scores.amax(dim=-1, keepdim=True)
            steps = torch.round_(top - scores).clamp_(max=len(self.attention_exp) - 1)
            e = lookup(self.attention_exp, steps)  # integers <= 2^15
            denominator = e.sum(dim=-1, keepdim=True, dtype=torch.float64)  # integer sum < 2^53: exact
            common = running_max[:, :, None, start + a : start + a + n, None]  # (B, KV, 1, n, 1)
            factor = torch.full_like(denominator, float(ATTENTION_ONE)) / (denominator * common.to(torch.float64))
            weights = torch.round_(e.mul_(value_scales[:, :, None, None, :visible]).mul_(factor.to(torch.float32)))
            mixed = torch.matmul(
                weights.view(b * kv_heads, group * n, visible), values[:, :, :visible].reshape(-1, visible, hd)
            )  # exact integers
            unit = common * (1.0 / ATTENTION_ONE)  # a power of two: exact
            out[:, :, :, a : a + n] = mixed.view(b, kv_heads, group, n, hd) * unit
        return out.permute(0, 3, 1, 2, 4).reshape(b, t, heads * hd)

    def hidden(self, tokens: torch.Tensor, cache: ExactKVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Run ``tokens`` (B, T) after what ``cache`` holds; return the final quantised rows and scales."""
        cfg = self.config
        b, t = tokens.shape
        start = cache.length
        heads, kv_heads, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        eps = cfg.rms_norm_eps
        x = self.embed[tokens].reshape(b * t, cfg.hidden_size)  # (B*T, C) float32
        for i, layer in enumerate(self.layers):
            qkv = layer["qkv"](*_norm_quantize(x, eps))
            q = qkv[:, : heads * hd].view(b, t, heads, hd)
            k = qkv[:, heads * hd : (heads + kv_heads) * hd].view(b, t, kv_heads, hd)
            v = qkv[:, (heads + kv_heads) * hd :].view(b, t, kv_heads, hd)
            attn = self._attention(self._rope(q, start), self._rope(k, start), v, cache, i, start)
            x = x + layer["o"](*quantize_rows(attn.reshape(b * t, heads * hd), ACT_MAX))
            gate_up = layer["gate_up"](*_norm_quantize(x, eps))
            inner = cfg.intermediate_size
            mixed = self._silu(gate_up[:, :inner]) * gate_up[:, inner:]
            x = x + layer["down"](*quantize_rows(mixed, ACT_MAX))
        cache.length = start + t
        return _norm_quantize(x, eps)

    def logits(self, rows: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """Final logits (M, V) float32 for rows returned by :meth:`hidden`."""
        return self.lm_head(rows, scales)

    def prefill(self, tokens: torch.Tensor, cache: ExactKVCache) -> None:
        """Run ``tokens`` (B, T) into ``cache`` only (no logits)."""
        self.hidden(tokens, cache)

    def forward(self, tokens: torch.Tensor, cache: ExactKVCache) -> torch.Tensor:
        """Logits (B, T, V) for ``tokens`` (B, T) after what ``cache`` holds."""
        return self.logits(*self.hidden(tokens, cache)).view(*tokens.shape, -1)
