"""The transformer forward pass (Llama, GPT-NeoX, GPT-2) in exact arithmetic: the same bits on every machine.

The recipe (``FORMAT.md``, "Exact numerics v1", is the normative text):

- weights int8, one scale per output channel; each norm's gain is folded
  into the weights of the matmuls it feeds before quantisation, and a
  LayerNorm's bias into their biases (``fixed_point_dot``: exact);
- activations int16 per token (``quantize_rows``) before every matmul, which
  runs as two exact int8 products (``integer_ops``); the RMSNorm statistic is
  the integer sum of squares of that same quantised row (< C * 2^30, exact in
  float64 for C < 2^23); LayerNorm also uses the integer row sum ``S`` and
  ``C * sum(q^2) - S^2`` in int64 (< C^2 * 2^30 < 2^63 for C < 2^16), and
  subtracts the mean after the product: ``W (q - S/C) = W q - (S/C) * W 1``
  with ``W 1`` the weight's exact integer row sums;
- RoPE from ``tables.rope_tables`` on the first ``rotary_dim`` dims of each
  head; learned positions (GPT-2) are one float32 addition;
- keys and values int8 per token and head, cached as int8;
- attention scores: int16 queries (split in bytes) against int8 keys in float32
  GEMMs, exact since 128 * 127 * head_dim < 2^24 for head_dim <= 1032, the sum
  of the two halves rounded once to float32 (in decoding steps the compiled
  kernels of ``kernels`` compute the same integer in int32 and round it the same);
- softmax: exp from a table on a 1/64 grid scaled to 2^15 (``tables.exp_table``),
  denominator an integer sum in float64 (exact below 2^53);
- attention-weighted values: weights requantised to integers ``w_t`` with
  ``sum_t w_t <= 2^15 + T/2`` against a common value scale (the running
  maximum of the value scales), so ``sum_t |w_t v_t| <= 127 (2^15 + T/2) < 2^24``
  for T < 198,000: a float32 GEMM (or ``kernels``'s int32 sum) is exact;
- SiLU and GELU from tables on a 1/256 grid (``tables.activation_table``);
  the final logits are float32 products of an exact int64 matmul result with
  two scales (and, for LayerNorm models, the folded bias).

Every reduction is exact and every other step is an elementwise IEEE
operation, so a position gets identical logits whether it is computed in a
full-sequence pass (the encoder) or one step at a time through the KV cache
(the decoder), alone or in any batch, with any number of threads. On the CPU,
decoding steps and full-sequence passes run the same operations in the
compiled kernels of ``kernels`` (``products.c``, ``attention.c``, ``rows.c``: the matrix products, attention
over the int8 cache, norms, activations),
which are checked against this module's torch path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch

from llmpipe.engine.decode_layers import DecodeLayers
from llmpipe.engine.exact_weights import ExactWeight
from llmpipe.engine.integer_ops import ACT_MAX, kernels_for, quantize_rows, split_bytes
from llmpipe.engine.kernels import MAX_HEAD_DIM, NetworkKernels
from llmpipe.models.config import ModelConfig
from llmpipe.numerics import tables
from llmpipe.numerics.tables import lookup

NUMERICS_VERSION = 1
KV_MAX = 127
ATTENTION_GRID = 64  # softmax exponent resolution inside attention: 1/64
ATTENTION_ONE = 1 << 15  # attention weights are fixed point with this unit
QUERY_BLOCK = 64  # full-sequence attention handles this many query positions at a time (memory only)


class ExactKVCache:
    """int8 keys and values with per-token float32 scales (a quarter of a float32 cache to read per step)."""

    def __init__(self, config: ModelConfig, batch: int, max_len: int, device: torch.device) -> None:
        shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_len)
        self.keys = torch.zeros(*shape, config.head_dim, dtype=torch.int8, device=device)  # (L, B, KV, T, hd)
        self.values = torch.zeros(*shape, config.head_dim, dtype=torch.int8, device=device)
        self.key_scales = torch.zeros(shape, device=device)  # (L, B, KV, T)
        self.value_scales = torch.zeros(shape, device=device)
        self.length = 0
        self.start = 0  # positions held by the steering prompt, which a restart keeps

    def reset(self) -> None:
        """Forget everything after the steering prompt."""
        self.length = self.start

    @staticmethod
    def bytes_per_position(config: ModelConfig) -> int:
        return 2 * config.num_hidden_layers * config.num_key_value_heads * (config.head_dim + 4)


class NormedRows(NamedTuple):
    """Rows after a norm, ready for a matmul: int16-valued ``q`` (M, C), ``scale`` (M, 1) and,
    for LayerNorm, the ``mean`` (M, 1, float64) of ``q`` to subtract; see :class:`ExactWeight`."""

    q: torch.Tensor
    scale: torch.Tensor
    mean: torch.Tensor | None

    def select(self, rows: slice) -> NormedRows:
        return NormedRows(self.q[rows], self.scale[rows], None if self.mean is None else self.mean[rows])


def _rms_norm_quantize(x: torch.Tensor, eps: float) -> NormedRows:
    """RMSNorm (its gain is in the next weights) fused with the int16 quantisation for the next matmul.

    ``x / rms(x)`` quantised per row is ``x`` quantised per row with a
    different scale, so only the scale carries the norm:
    ``rms^2 = scale^2 * sum(q^2) / C + eps`` with the exact integer sum.
    """
    kernels = kernels_for(x.device)
    if kernels is not None and x.dtype == torch.float32 and x.shape[0]:  # one pass of the compiled kernel, same bits
        return NormedRows(*kernels.rms_norm_quantize(x.contiguous(), ACT_MAX, eps), None)
    q, scale = quantize_rows(x, ACT_MAX)
    scale64 = scale.to(torch.float64)
    squares = (q.to(torch.float64) ** 2).sum(dim=-1, keepdim=True)  # integers < C * 2^30: exact
    mean_square = squares * scale64 * scale64 * (1.0 / x.shape[-1]) + eps
    inverse_rms = torch.reciprocal(torch.sqrt(mean_square))
    return NormedRows(q, (scale64 * inverse_rms).to(torch.float32), None)


def _layer_norm_quantize(x: torch.Tensor, eps: float) -> NormedRows:
    """LayerNorm (gain and bias are in the next weights) fused with the int16 quantisation.

    With ``q`` the quantised row, ``S = sum(q)`` and ``Q = sum(q^2)`` (exact
    int64 sums), the variance is ``scale^2 (C Q - S^2) / C^2``, where
    ``C Q - S^2`` is an exact int64 (< C^2 2^30); the mean ``S / C`` is
    subtracted after the matmul (:class:`ExactWeight`).
    """
    q, scale = quantize_rows(x, ACT_MAX)
    c = x.shape[-1]
    whole = q.to(torch.int64)
    sums = whole.sum(dim=-1, keepdim=True)
    spread = (whole * whole).sum(dim=-1, keepdim=True) * c - sums * sums  # C Q - S^2 >= 0, exact
    scale64 = scale.to(torch.float64)
    variance = spread.to(torch.float64) * scale64 * scale64 * (1.0 / (c * c)) + eps
    inverse_std = torch.reciprocal(torch.sqrt(variance))
    return NormedRows(q, (scale64 * inverse_std).to(torch.float32), sums.to(torch.float64) * (1.0 / c))


class ExactTransformer:
    """A transformer on prepared exact weights; see the module docstring for the arithmetic."""

    def __init__(
        self,
        config: ModelConfig,
        exact_weights: Mapping[str, torch.Tensor],
        device: str | torch.device = "cpu",
    ) -> None:
        """Takes each tensor of ``exact_weights`` (possibly read lazily from a file) to ``device`` in turn.
        The compiled kernels run where ``kernels`` has them (``LLMPIPE_NATIVE=0``: torch only, same results)."""
        self.config = config
        self.device = torch.device(device)
        if self.device.type == "cuda":  # TF32 would round the float32 GEMMs' integer inputs
            torch.backends.cuda.matmul.allow_tf32 = False

        def tensor(name: str) -> torch.Tensor | None:
            return exact_weights[name].to(self.device) if name in exact_weights else None

        self.kernels = kernels_for(self.device)

        def weight(name: str) -> ExactWeight:
            return ExactWeight(tensor(f"{name}.pairs"), tensor(f"{name}.scale"), tensor(f"{name}.bias"), self.kernels)

        self.embed = tensor("embed")
        self.positions = tensor("positions")  # learned position embeddings (GPT-2)
        mlp_in = "gate_up" if config.gated_mlp else "up"
        self.layers = [
            {part: weight(f"{i}.{part}") for part in ("qkv", "o", mlp_in, "down")}
            for i in range(config.num_hidden_layers)
        ]
        self.lm_head = weight("lm_head")
        self.norm = _rms_norm_quantize if config.norm == "rms" else _layer_norm_quantize
        if config.positions == "rope":
            cos, sin = tables.rope_tables(config.rope_theta, config.rotary_dim, config.max_position_embeddings)
            self.rope_cos, self.rope_sin = torch.from_numpy(cos).to(self.device), torch.from_numpy(sin).to(self.device)
        exp = torch.from_numpy(tables.exp_table(ATTENTION_GRID, 15)).to(torch.float32)  # exact
        self.attention_exp = exp.to(self.device)
        activation = tables.activation_table(config.activation)
        self.activation_table = torch.from_numpy(activation).to(self.device)
        self.activation_limit = (len(activation) - 1) // 2
        # IEEE sqrt and division are correctly rounded: the same float everywhere; times the grid (a power of two)
        self.score_factor = torch.tensor(ATTENTION_GRID / math.sqrt(config.head_dim), device=self.device)
        attention = self.kernels if config.head_dim <= MAX_HEAD_DIM else None
        self.attention_kernels = (
            attention if attention is not None and self._native_attention_agrees(attention) else None
        )
        self._decode_layers = None  # a decoding step's layers in one call (Llama-shaped models, the kernels here)
        if self.attention_kernels is not None and DecodeLayers.fits(config, self.layers):
            activation = (self.activation_table, self.activation_limit)
            rope, factor = (self.rope_cos, self.rope_sin), float(self.score_factor)
            self._decode_layers = DecodeLayers(
                config, self.layers, self.attention_kernels, rope, factor, self.attention_exp, activation, KV_MAX
            )
        self._prompt: ExactKVCache | None = None

    def _native_attention_agrees(self, kernels: NetworkKernels) -> bool:
        """Does the compiled ``attention`` give the torch path's bits on this model's head shapes (a small
        random cache with extreme values, one and five queries)?"""
        cfg = self.config
        generator = torch.Generator().manual_seed(0)
        cache = ExactKVCache(cfg, 2, 37, self.device)
        for cached in (cache.keys, cache.values):
            cached.copy_(torch.randint(-KV_MAX, KV_MAX + 1, cached.shape, generator=generator, dtype=torch.int8))
            cached[0, 0, 0, 3] = KV_MAX
        for scales in (cache.key_scales, cache.value_scales):
            scales.copy_(torch.rand(scales.shape, generator=generator) * torch.exp2(torch.randint(-9, 3, scales.shape)))
        kv_heads, hd = cfg.num_key_value_heads, cfg.head_dim
        group = cfg.num_attention_heads // kv_heads
        for t in (1, 5):
            qq = torch.randint(-ACT_MAX, ACT_MAX + 1, (2, kv_heads, group, t, hd), generator=generator).float()
            qq[0, 0, 0, 0] = ACT_MAX
            qs = torch.rand(2, kv_heads, group, t, generator=generator) * 2e-3
            expected = self._attention_torch(qq, qs, cache, 0, 37 - t)
            cached = tuple(x[0].flatten(0, 1) for x in (cache.keys, cache.values, cache.key_scales, cache.value_scales))
            queries = qq.to(torch.int16).reshape(2 * kv_heads, group, t, hd)
            got = kernels.attention(queries, qs.reshape(2 * kv_heads, group, t), cached, self.attention_exp, 37)
            if not torch.equal(got.view_as(expected), expected):
                return False
        return True

    def set_prompt(self, rows: torch.Tensor | None) -> None:
        """Put ``rows`` (P, C) float32 embedding rows before every sequence: their keys and values are
        computed once here (exactly, so the same as in any batch) and copied into each new cache."""
        self._prompt = None
        if rows is not None:
            self._prompt = ExactKVCache(self.config, 1, len(rows), self.device)
            with torch.inference_mode():
                self._hidden(rows.to(self.device, torch.float32)[None], self._prompt)

    def new_cache(self, batch: int, max_len: int) -> ExactKVCache:
        """A cache for ``batch`` rows of ``max_len`` positions after the prompt, holding the prompt."""
        held = self._prompt.length if self._prompt else 0
        cache = ExactKVCache(self.config, batch, held + max_len, self.device)
        if self._prompt:
            for mine, prompt in (
                (cache.keys, self._prompt.keys),
                (cache.values, self._prompt.values),
                (cache.key_scales, self._prompt.key_scales),
                (cache.value_scales, self._prompt.value_scales),
            ):
                mine[:, :, :, :held] = prompt  # broadcast over the rows
            cache.length = cache.start = held
        return cache

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate the first ``rotary_dim`` dims of each head; x: (B, T, heads, hd) float32, ``cos`` and
        ``sin`` the tables' rows (T, rotary_dim) of its positions."""
        dim = self.config.rotary_dim
        cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, rotary_dim)
        part = x[..., :dim]  # all of x for Llama
        rotated = torch.cat([-part[..., dim // 2 :], part[..., : dim // 2]], dim=-1)
        turned = part * cos + rotated * sin
        return turned if dim == x.shape[-1] else torch.cat([turned, x[..., dim:]], dim=-1)

    def _activation(self, g: torch.Tensor) -> torch.Tensor:
        """The MLP's activation by table; past the table's range the identity (above) or 0 (below)."""
        limit = self.activation_limit
        steps = torch.round(g * float(tables.ACTIVATION_GRID))
        table = lookup(self.activation_table, steps.clamp(-limit, limit).add_(limit))
        return torch.where(steps >= limit, g, torch.where(steps <= -limit, 0.0, table))

    def _attention(self, qkv: torch.Tensor, shape: tuple[int, int], cache: ExactKVCache, layer: int) -> torch.Tensor:
        """The qkv matmul's output (B * T, (H + 2 KV) hd) for ``shape`` = (B, T) tokens after the cache's
        ``length`` positions -> (B * T, H * hd): RoPE, quantisation, the cache's new keys and values, attention."""
        cfg = self.config
        (b, t), start = shape, cache.length
        heads, kv_heads, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        group = heads // kv_heads
        end = start + t
        rope = None if cfg.positions != "rope" else (self.rope_cos[start:end], self.rope_sin[start:end])
        if self.attention_kernels is not None:
            planes = (cache.keys[layer], cache.values[layer], cache.key_scales[layer], cache.value_scales[layer])
            limits, factor = (ACT_MAX, KV_MAX), float(self.score_factor)
            qq, qs = self.kernels.prepare_qkv(qkv, (b, t, heads, kv_heads, hd), rope, factor, limits, planes, start)
            cached = tuple(x[:b].flatten(0, 1) for x in planes)  # (B * KV, T, ...): views of the cache itself
            queries, scales = qq.view(b * kv_heads, group, t, hd), qs.view(b * kv_heads, group, t)
            out = self.attention_kernels.attention(queries, scales, cached, self.attention_exp, end)
        else:
            q = qkv[:, : heads * hd].view(b, t, heads, hd)
            k = qkv[:, heads * hd : (heads + kv_heads) * hd].view(b, t, kv_heads, hd)
            v = qkv[:, (heads + kv_heads) * hd :].view(b, t, kv_heads, hd)
            if rope is not None:
                q, k = self._rope(q, *rope), self._rope(k, *rope)
            kq, ks = quantize_rows(k, KV_MAX)  # per token and head
            vq, vs = quantize_rows(v, KV_MAX)
            cache.keys[layer, :b, :, start:end] = kq.transpose(1, 2)  # integers in [-127, 127]: exact as int8
            cache.values[layer, :b, :, start:end] = vq.transpose(1, 2)
            cache.key_scales[layer, :b, :, start:end] = ks[..., 0].transpose(1, 2)
            cache.value_scales[layer, :b, :, start:end] = vs[..., 0].transpose(1, 2)
            qq, qs = quantize_rows(q, ACT_MAX)  # (B, T, H, hd), (B, T, H, 1)
            qq = qq.view(b, t, kv_heads, group, hd).permute(0, 2, 3, 1, 4)  # (B, KV, G, T, hd)
            qs = qs.view(b, t, kv_heads, group).permute(0, 2, 3, 1) * self.score_factor  # includes x64
            out = self._attention_torch(qq, qs, cache, layer, start)
        return out.view(b, kv_heads, group, t, hd).permute(0, 3, 1, 2, 4).reshape(b * t, heads * hd)

    def _attention_torch(self, qq, qs, cache: ExactKVCache, layer: int, start: int) -> torch.Tensor:
        """Integer queries ``qq`` (B, KV, G, T, hd) with scales ``qs`` (B, KV, G, T) over the cache's first
        ``start + T`` positions -> (B, KV, G, T, hd) float32, in float32 GEMMs on a float32 copy of the
        visible cache (exact: module docstring). ``kernels``'s ``attention`` computes the same numbers."""
        b, kv_heads, group, t, hd = qq.shape
        end = start + t
        keys = cache.keys[layer, :b, :, :end].reshape(b * kv_heads, end, hd).to(torch.float32)
        values = cache.values[layer, :b, :, :end].reshape(b * kv_heads, end, hd).to(torch.float32)
        key_scales = cache.key_scales[layer, :b, :, None, :end]  # (B, KV, 1, S)
        value_scales = cache.value_scales[layer, :b, :, :end]  # (B, KV, S)
        running_max = value_scales.cummax(dim=-1).values  # common value scale per query position
        out = torch.empty(b, kv_heads, group, t, hd, device=self.device)
        for a in range(0, t, QUERY_BLOCK):  # query blocks only bound memory; each position is independent
            n = min(QUERY_BLOCK, t - a)
            visible = start + a + n  # keys a query in this block may see, at most
            both = split_bytes(qq[:, :, :, a : a + n].reshape(b * kv_heads, group * n, hd), dim=1)  # int8-valued
            raw = torch.matmul(both, keys[:, :visible].transpose(1, 2))  # exact integers: every sum < 2^24
            dots = (raw[:, : group * n] * 256.0 + raw[:, group * n :]).view(b, kv_heads, group, n, visible)
            # scores in units of 1/ATTENTION_GRID (a power of two, folded into the query scale: exact)
            scores = dots * qs[:, :, :, a : a + n, None] * key_scales[..., :visible].unsqueeze(2)
            if t > 1:  # positions after each query are invisible
                rows = torch.arange(start + a, start + a + n, device=self.device)[:, None]
                hidden = torch.arange(visible, device=self.device)[None, :] > rows  # (n, visible)
                scores = scores.masked_fill_(hidden, float("-inf"))
            top = scores.amax(dim=-1, keepdim=True)
            steps = torch.round_(top - scores).clamp_(max=len(self.attention_exp) - 1)
            e = lookup(self.attention_exp, steps)  # integers <= 2^15
            denominator = e.sum(dim=-1, keepdim=True, dtype=torch.float64)  # integer sum < 2^53: exact
            common = running_max[:, :, None, start + a : start + a + n, None]  # (B, KV, 1, n, 1)
            factor = torch.full_like(denominator, float(ATTENTION_ONE)) / (denominator * common.to(torch.float64))
            weights = torch.round_(e.mul_(value_scales[:, :, None, None, :visible]).mul_(factor.to(torch.float32)))
            mixed = torch.matmul(weights.view(b * kv_heads, group * n, visible), values[:, :visible])  # exact
            unit = common * (1.0 / ATTENTION_ONE)  # a power of two: exact
            out[:, :, :, a : a + n] = mixed.view(b, kv_heads, group, n, hd) * unit
        return out

    def _mlp(self, layer: dict, normed: NormedRows) -> torch.Tensor:
        if self.config.gated_mlp:
            gate_up = layer["gate_up"](*normed)
            inner = self.config.intermediate_size
            gate, up = gate_up[:, :inner], gate_up[:, inner:]
            if self.kernels is not None:
                mixed = self.kernels.activation(gate, up, tables.ACTIVATION_GRID, self.activation_table)
            else:
                mixed = self._activation(gate) * up
        elif self.kernels is not None:
            mixed = self.kernels.activation(layer["up"](*normed), None, tables.ACTIVATION_GRID, self.activation_table)
        else:
            mixed = self._activation(layer["up"](*normed))
        return layer["down"](*quantize_rows(mixed, ACT_MAX))

    def hidden(self, tokens: torch.Tensor, cache: ExactKVCache) -> NormedRows:
        """Run ``tokens`` (B, T) after what ``cache`` holds; return the final normed rows (B * T of them)."""
        return self._hidden(self.embed[tokens.to(self.device)], cache)

    def _hidden(self, x: torch.Tensor, cache: ExactKVCache) -> NormedRows:
        """The network on float32 embedding rows ``x`` (B, T, C) after what ``cache`` holds."""
        cfg = self.config
        b, t, _ = x.shape
        start = cache.length
        eps = cfg.norm_eps
        if self.positions is not None:
            x = x + self.positions[start : start + t]
        x = x.reshape(b * t, cfg.hidden_size)
        if t == 1 and self._decode_layers is not None and self._decode_layers.wanted(b):
            x = x.contiguous()
            planes = (cache.keys, cache.values, cache.key_scales, cache.value_scales)
            if self._decode_layers.run(x, planes, start):  # the same kernels as below, in one call
                cache.length = start + t
                return self.norm(x, eps)
            raise MemoryError("decode_layers: no memory for its scratch rows")
        for i, layer in enumerate(self.layers):
            attn = self._attention(layer["qkv"](*self.norm(x, eps)), (b, t), cache, i)
            attn = layer["o"](*quantize_rows(attn, ACT_MAX))
            if cfg.parallel_residual:
                x = x + attn + self._mlp(layer, self.norm(x, eps))
            else:
                x = x + attn
                x = x + self._mlp(layer, self.norm(x, eps))
        cache.length = start + t
        return self.norm(x, eps)

    def logits(self, rows: NormedRows) -> torch.Tensor:
        """Final logits (M, V) float32 on the CPU for rows returned by :meth:`hidden`."""
        return self.lm_head(*rows).cpu()

    def prefill(self, tokens: torch.Tensor, cache: ExactKVCache) -> None:
        """Run ``tokens`` (B, T) into ``cache`` only (no logits)."""
        self.hidden(tokens, cache)

    def forward(self, tokens: torch.Tensor, cache: ExactKVCache) -> torch.Tensor:
        """Logits (B, T, V) for ``tokens`` (B, T) after what ``cache`` holds."""
        return self.logits(self.hidden(tokens, cache)).view(*tokens.shape, -1)
