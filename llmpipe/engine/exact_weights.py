"""The exact engine's weights: norms folded into the matmuls after them, int8 with per-channel scales.

``prepare_exact_weights`` derives them from a model's float weights once (any
machine derives the same bits: ``FORMAT.md``, "Exact numerics v1"), and
``ExactWeight`` is one of them at work: int16-range rows times its int8
matrix, in the compiled kernel where it is faster (``kernels``) or as two
exact int8 products (``integer_ops``), the same bits either way.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property

import torch

from llmpipe.engine.integer_ops import (
    fused_products_win,
    int8_products,
    int16_int8_matmul,
    pair_rows,
    quantize_weight,
    unpair_rows,
)
from llmpipe.engine.kernels import NetworkKernels
from llmpipe.models.config import ModelConfig


class ExactWeight:
    """An int8 (K, N) weight with its per-channel scales and bias, in the kernels' paired layout
    (``integer_ops.pair_rows``) and, for the torch path, as (K, N) rows."""

    def __init__(
        self,
        pairs: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        kernels: NetworkKernels | None = None,
    ) -> None:
        # (ceil(K/2), N, 2) int8 as prepared: on the CPU the cache file's own pages, no copy. Without kernels
        # only the torch path's rows are kept (made now: a GPU holds the weights once).
        self.pairs = pairs if kernels is not None else None
        self._rows = None if kernels is not None else unpair_rows(pairs)
        self.scale = scale.to(torch.float32).contiguous()  # (N,)
        self.bias = None if bias is None else bias.contiguous()  # (N,) float32
        self.kernels = kernels  # combine the two products in one pass (``kernels``), same bits

    @property
    def q_t(self) -> torch.Tensor:
        """The (K', N) int8 rows the torch path multiplies by (K' = K rounded up to even, the last row zero
        after an odd K): with kernels made on first use only (where torch's int8 product is the faster)."""
        if self._rows is None:
            self._rows = unpair_rows(self.pairs)
        return self._rows

    @cached_property
    def row_sums(self) -> torch.Tensor:
        """``W 1`` (N,) float64, exact (|.| < 2^7 K): only matmuls after a LayerNorm need it."""
        if self.pairs is not None:
            return self.pairs.sum(dim=(0, 2), dtype=torch.int64).to(torch.float64)
        return self.q_t.sum(dim=0, dtype=torch.int64).to(torch.float64)

    def __call__(self, xq: torch.Tensor, row_scale: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
        """``(M, K)`` quantised rows with ``(M, 1)`` scales -> float32 ``(M, N)``.

        ``mean`` (``(M, 1)`` float64, LayerNorm only) is subtracted from every
        input element, as ``W q - mean * W 1`` after the exact product.
        """
        if self.kernels is not None and fused_products_win(self.kernels):  # one int16 product per weight, same bits
            sums = None if mean is None else self.row_sums
            return self.kernels.exact_matmul(xq, row_scale, self.pairs, self.scale, self.bias, mean, sums)
        q_t = self.q_t[: xq.shape[1]]  # without the zero row of an odd K
        if mean is None and self.kernels is not None:
            return self.kernels.combine_products(int8_products(xq, q_t), row_scale, self.scale, self.bias)
        high, low = int16_int8_matmul(xq, q_t)  # (M, N) int32 each, exact
        if mean is None:
            # 256 * high is exact in float32; the sum is the one rounding; then the two scales
            out = high.to(torch.float32).mul_(256.0).add_(low.to(torch.float32))
        else:  # 256 * high + low is exact in float64; then the centring and one rounding to float32
            out = high.to(torch.float64).mul_(256.0).add_(low.to(torch.float64)).sub_(mean * self.row_sums)
            out = out.to(torch.float32)
        out = out.mul_(row_scale).mul_(self.scale)
        return out if self.bias is None else out.add_(self.bias)


def fixed_point_dot(weight: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """``weight @ vector`` (float32 (N, K) and (K,)) -> float32 (N,), the same bits on every machine.

    Each product is exact in float64 (24 + 24 bits); it is rounded to a multiple
    of ``2^(e - 40)``, where ``2^e`` bounds the row's largest product, and the
    integers (each below 2^40, K below 2^23) are summed exactly in int64.
    Folds a LayerNorm's bias into the next matmul's bias when preparing weights.
    """
    products = weight.to(torch.float64) * vector.to(torch.float64)[None, :]
    _, exponent = torch.frexp(products.abs().amax(dim=1, keepdim=True))  # largest < 2^exponent
    unit = torch.ldexp(torch.ones_like(products[:, :1]), exponent - 40)
    total = torch.round(products / unit).to(torch.int64).sum(dim=1, keepdim=True)
    return (total.to(torch.float64) * unit)[:, 0].to(torch.float32)


def prepare_exact_weights(config: ModelConfig, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold norms into the matmuls after them and quantise: the tensors the exact engine runs on.

    Deterministic (max, elementwise IEEE products, rounding and exact integer
    sums only), so any machine derives the same int8 weights from the same
    float weights.
    """
    out: dict[str, torch.Tensor] = {}

    def put(name: str, parts: list[str], norm: str | None = None) -> None:
        """Quantise the concatenated canonical weights ``parts`` (with their biases) after norm ``norm``."""
        weight = torch.cat([weights[f"{part}.weight"] for part in parts]).to(torch.float32)
        bias = None
        if any(f"{part}.bias" in weights for part in parts):  # a missing bias among them is zeros
            zeros = [torch.zeros(weights[f"{part}.weight"].shape[0]) for part in parts]
            bias = torch.cat([weights.get(f"{part}.bias", z) for part, z in zip(parts, zeros, strict=True)])
            bias = bias.to(torch.float32)
        if norm is not None:
            if f"{norm}.bias" in weights:  # W (n g + b) + c = (W g) n + (W b + c)
                folded = fixed_point_dot(weight, weights[f"{norm}.bias"].to(torch.float32))
                bias = folded if bias is None else bias + folded
            weight = weight * weights[f"{norm}.weight"].to(torch.float32)[None, :]
        q, scale = quantize_weight(weight)
        out[f"{name}.pairs"], out[f"{name}.scale"] = pair_rows(q.t()), scale  # (K, N), paired as the kernels read it
        if bias is not None:
            out[f"{name}.bias"] = bias.contiguous()

    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        attn = [p + f"self_attn.{n}_proj" for n in "qkv"]
        put(f"{i}.qkv", attn, p + "input_layernorm")
        put(f"{i}.o", [p + "self_attn.o_proj"])
        if config.gated_mlp:
            put(f"{i}.gate_up", [p + "mlp.gate_proj", p + "mlp.up_proj"], p + "post_attention_layernorm")
        else:
            put(f"{i}.up", [p + "mlp.up_proj"], p + "post_attention_layernorm")
        put(f"{i}.down", [p + "mlp.down_proj"])
    embed = weights["model.embed_tokens.weight"]
    put("lm_head", ["model.embed_tokens" if config.tie_word_embeddings else "lm_head"], "model.norm")
    out["embed"] = embed.to(torch.float32).contiguous()
    if "model.embed_positions.weight" in weights:
        out["positions"] = weights["model.embed_positions.weight"].to(torch.float32).contiguous()
    return out
