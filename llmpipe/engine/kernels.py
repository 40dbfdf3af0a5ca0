"""The engine's compiled kernels (``products.c``, ``attention.c``, ``rows.c``, ``layers.c``): typed calls into them.

A decoding step reads every cached key and value of every row; with the
cache held as int8 instead of float32 that is a quarter of the memory
traffic, but torch has no batched int8 product on the CPU. These kernels do
the network's matrix products and the two products of attention in exact
integer arithmetic, so they return the same integers as the float32 GEMMs
they replace (``exact_transformer``), and the elementwise passes around them
(quantising rows, splitting them into bytes, norms, activations, the
queries' and keys' preparation) in one pass each, with the same float32
operations as torch's half-dozen. ``integer_ops.kernels_for`` builds them
through ``numerics.native`` and checks them on a known answer before any use.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path

import torch

from llmpipe.numerics.native import COUNT, FLAGS, INT64, POINTER, build, load

SOURCES = tuple(Path(__file__).with_name(name) for name in ("products.c", "attention.c", "rows.c", "layers.c"))
HEADERS = (Path(__file__).with_name("kernels.h"), Path(__file__).with_name("products.h"))
MAX_HEAD_DIM = 512
"""The kernels' scratch size (``kernels.h``); models with larger heads use the torch path."""
_FLOAT, _DOUBLE = ctypes.c_float, ctypes.c_double
SIGNATURES = {
    "quantize_rows": ([POINTER] * 3 + [INT64] * 2 + [_FLOAT, COUNT], None),
    "split_bytes": ([POINTER] * 2 + [INT64] * 2 + [COUNT], None),
    "attention": ([POINTER] * 7 + [INT64, POINTER] + [INT64] * 7 + [COUNT], ctypes.c_int),
    "combine_products": ([POINTER] * 5 + [INT64] * 2 + [COUNT], None),
    "rms_norm_quantize": ([POINTER] * 3 + [INT64] * 2 + [_FLOAT, _DOUBLE, COUNT], None),
    "prepare_qkv": (
        [POINTER] + [INT64] * 7 + [POINTER] * 2 + [_FLOAT] * 3 + [POINTER] * 6 + [INT64] * 2 + [COUNT],
        None,
    ),
    "activation": ([POINTER] * 2 + [INT64, _FLOAT, POINTER, INT64, POINTER] + [INT64] * 2 + [COUNT], None),
    "exact_matmul": ([POINTER] * 8 + [INT64] * 3 + [COUNT], ctypes.c_int),
    "decode_layers": (
        [POINTER] + [INT64] * 3 + [POINTER] + [INT64] * 4 + [POINTER] * 2 + [INT64] + [_FLOAT] * 3 + [POINTER] * 4
        + [INT64] * 3 + [POINTER, INT64, POINTER, INT64, _FLOAT, _DOUBLE, POINTER, COUNT],
        ctypes.c_int,
    ),
}


class NetworkKernels:
    """Typed calls into the compiled library, on torch's current number of threads. Tensors are CPU
    tensors; ``keys``/``values`` are (N, T, hd) int8 views whose last two dimensions are contiguous (rows
    may be further apart: a slice of the cache)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._library = library

    @staticmethod
    def _rows(cached: torch.Tensor) -> tuple[int, int]:
        n, _, hd = cached.shape
        if cached.stride(2) != 1 or cached.stride(1) != hd:
            raise ValueError("cached keys/values need contiguous (position, dim) planes")
        return n, cached.stride(0)

    def attention(
        self,
        q: torch.Tensor,
        qscale: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        exp: torch.Tensor,
        length: int,
    ) -> torch.Tensor:
        """The last ``Q`` positions' attention over the first ``length`` cached ones (``attention.c``):
        ``q`` (N, G, Q, hd) int16, ``qscale`` (N, G, Q) float32, ``cache`` the keys and values (N, T, hd)
        int8 and their scales (N, T) float32 -> (N, G, Q, hd) float32."""
        keys, values, key_scales, value_scales = cache
        n, kv_stride = self._rows(keys)
        if self._rows(values)[1] != kv_stride or key_scales.stride() != value_scales.stride():
            raise ValueError("keys and values (and their scales) need the same layout")
        if key_scales.stride(1) != 1:
            raise ValueError("cached scales need contiguous positions")
        q, qscale = q.contiguous(), qscale.contiguous()
        _, group, queries, hd = q.shape
        out = torch.empty(n, group, queries, hd)
        pointers = [t.data_ptr() for t in (q, qscale, keys, values, key_scales, value_scales, exp)]
        sizes = (n, group, queries, hd, length, kv_stride, key_scales.stride(0))
        threads = torch.get_num_threads()
        if self._library.attention(*pointers, len(exp), out.data_ptr(), *sizes, threads):
            raise MemoryError("attention: no memory for its scratch rows")
        return out

    def rms_norm_quantize(self, x: torch.Tensor, qmax: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``exact_transformer._rms_norm_quantize`` of a contiguous float32 ``x`` (M, C): the integers
        (float32) and the (M, 1) row scales."""
        q = torch.empty_like(x)
        row_scale = torch.empty(x.shape[0], 1)
        arguments = (x.data_ptr(), q.data_ptr(), row_scale.data_ptr(), x.shape[0], x.shape[1], qmax, eps)
        self._library.rms_norm_quantize(*arguments, torch.get_num_threads())
        return q, row_scale

    def prepare_qkv(
        self,
        qkv: torch.Tensor,
        shape: tuple[int, int, int, int, int],
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        score_factor: float,
        limits: tuple[int, int],
        cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        start: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The qkv matmul's output (B * T, (H + 2 KV) hd), ``shape`` = (B, T, H, KV, hd), rotated (``rope``:
        the cos and sin rows from position ``start``, (T, rotary) each, or None) and quantised to the
        ``limits`` (queries, keys and values): returns the queries (B, KV, G, T, hd) int16 and their
        scales times ``score_factor`` (B, KV, G, T); writes keys and values into ``cache`` (one layer's
        keys, values (B', KV, capacity, hd) int8 and their scales (B', KV, capacity)) at ``start``."""
        b, t, heads, kv_heads, hd = shape
        keys, values, key_scales, value_scales = cache
        if qkv.stride(1) != 1 or not all(x.is_contiguous() for x in cache):
            raise ValueError("prepare_qkv needs rows of contiguous heads and contiguous cache planes")
        group = heads // kv_heads
        q = torch.empty(b, kv_heads, group, t, hd, dtype=torch.int16)
        q_scale = torch.empty(b, kv_heads, group, t)
        cos, sin = (x.contiguous() for x in rope) if rope is not None else (q_scale, q_scale)  # unread if None
        rotary = cos.shape[1] if rope is not None else 0
        sizes = (qkv.stride(0), b, t, heads, kv_heads, hd, rotary)
        outputs = (q, q_scale, keys, values, key_scales, value_scales)
        self._library.prepare_qkv(
            qkv.data_ptr(),
            *sizes,
            cos.data_ptr(),
            sin.data_ptr(),
            score_factor,
            *limits,
            *(x.data_ptr() for x in outputs),
            keys.shape[2],
            start,
            torch.get_num_threads(),
        )
        return q, q_scale

    def combine_products(
        self, parts: torch.Tensor, row_scale: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """``ExactWeight``'s float32 output (M, N) from the (2M, N) int32 products (high bytes first), the
        (M, 1) row scales, (N,) scales and bias (or None)."""
        rows, cols = parts.shape[0] // 2, parts.shape[1]
        parts, row_scale = parts.contiguous(), row_scale.contiguous()
        out = torch.empty(rows, cols)
        pointers = [t.data_ptr() if t is not None else None for t in (parts, row_scale, scale, bias, out)]
        self._library.combine_products(*pointers, rows, cols, torch.get_num_threads())
        return out

    def exact_matmul(
        self,
        q: torch.Tensor,
        row_scale: torch.Tensor,
        weight_pairs: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        mean: torch.Tensor | None = None,
        row_sums: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``ExactWeight``'s float32 output (M, N) for integer-valued float32 ``q`` (M, K) with (M, 1) row
        scales, an int8 (K, N) weight as ``integer_ops.pair_rows`` lays it out (``weight_pairs``,
        (ceil(K / 2), N, 2)), (N,) scales and bias (or None); with ``mean`` (M, 1) and ``row_sums`` (N,)
        float64 for LayerNorm rows. One int16 product per weight (``products.c``), the spec's bits."""
        q, row_scale, weight_pairs = q.contiguous(), row_scale.contiguous(), weight_pairs.contiguous()
        rows, depth = q.shape
        if weight_pairs.shape[0] != (depth + 1) // 2 or weight_pairs.shape[2] != 2:
            raise ValueError(f"exact_matmul: weight pairs {tuple(weight_pairs.shape)} for a depth of {depth}")
        out = torch.empty(rows, weight_pairs.shape[1])
        if mean is not None:
            mean, row_sums = mean.contiguous(), row_sums.contiguous()
        tensors = (q, row_scale, weight_pairs, scale, bias, mean, row_sums, out)
        pointers = [t.data_ptr() if t is not None else None for t in tensors]
        if self._library.exact_matmul(*pointers, rows, depth, weight_pairs.shape[1], torch.get_num_threads()):
            raise MemoryError("exact_matmul: no memory for its scratch rows")
        return out

    def decode_layers(
        self,
        x: torch.Tensor,
        weights: torch.Tensor,
        shape: tuple[int, int, int, int],
        inner: int,
        rope: tuple[torch.Tensor, torch.Tensor],
        score_factor: float,
        limits: tuple[int, int],
        cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        start: int,
        exp: torch.Tensor,
        activation: tuple[torch.Tensor, int, float],
        eps: float,
        seconds: torch.Tensor | None = None,
    ) -> bool:
        """``layers.c``: a decoding step's Llama layers on ``x`` (B, C) float32 in place, ``shape`` = (layers,
        heads, KV heads, hd), ``weights`` the (layers x 8,) addresses of each int8 matrix (paired rows) and its scales
        (q|k|v, o, gate|up, down), ``rope`` the cos and sin rows of position ``start``, ``cache`` all layers'
        keys, values (L, B', KV, capacity, hd) int8 and their scales (L, B', KV, capacity), ``activation``
        the table, its limit and grid; ``seconds``, if given, a float64 (3,) tensor the time spent in the
        products, the attention and the norms and activations is added to (``bench.py throughput``'s profile).
        False when scratch memory could not be had (x, cache half done)."""
        layers, heads, kv_heads, hd = shape
        keys = cache[0]
        if not (x.is_contiguous() and all(t.is_contiguous() for t in (*cache, *rope, exp, activation[0]))):
            raise ValueError("decode_layers needs contiguous tensors")
        if seconds is not None and (seconds.dtype != torch.float64 or seconds.shape != (3,)):
            raise ValueError("decode_layers' seconds: a float64 tensor of 3")
        table, limit, grid = activation
        arguments = (
            [x.data_ptr(), x.shape[0], x.shape[1], layers, weights.data_ptr(), heads, kv_heads, hd, inner]
            + [rope[0].data_ptr(), rope[1].data_ptr(), rope[0].shape[1], score_factor, *limits]
            + [t.data_ptr() for t in cache]
            + [keys.shape[1], keys.shape[3], start, exp.data_ptr(), len(exp), table.data_ptr(), limit, grid, eps]
            + [seconds.data_ptr() if seconds is not None else None]
        )
        return self._library.decode_layers(*arguments, torch.get_num_threads()) == 0

    def activation(self, x: torch.Tensor, up: torch.Tensor | None, grid: float, table: torch.Tensor) -> torch.Tensor:
        """``ExactTransformer._activation`` of ``x`` (M, C) float32 (times ``up``, same shape and row stride,
        when given) with ``table`` on a 1/``grid`` grid -> (M, C) contiguous."""
        if x.stride(1) != 1 or (up is not None and up.stride() != x.stride()):
            raise ValueError("activation inputs need contiguous rows with one stride")
        rows, cols = x.shape
        out = torch.empty(rows, cols)
        limit = (len(table) - 1) // 2
        up_pointer = up.data_ptr() if up is not None else None
        arguments = (x.data_ptr(), up_pointer, x.stride(0), grid, table.data_ptr(), limit, out.data_ptr(), rows, cols)
        self._library.activation(*arguments, torch.get_num_threads())
        return out

    def quantize_rows(self, x: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``integer_ops.quantize_rows`` of a contiguous float32 ``x`` (..., C): the integers (float32) and
        the rows' largest magnitudes ``amax`` (..., 1)."""
        q = torch.empty_like(x)
        amax = torch.empty(*x.shape[:-1], 1, dtype=torch.float32)
        sizes = (x.numel() // max(1, x.shape[-1]), x.shape[-1])
        self._library.quantize_rows(x.data_ptr(), q.data_ptr(), amax.data_ptr(), *sizes, qmax, torch.get_num_threads())
        return q, amax

    def split_bytes(self, q: torch.Tensor) -> torch.Tensor:
        """``integer_ops.split_bytes`` of a contiguous (M, K) float32 ``q``, as int8 (2M, K)."""
        out = torch.empty(2 * q.shape[0], q.shape[1], dtype=torch.int8)
        self._library.split_bytes(q.data_ptr(), out.data_ptr(), q.shape[0], q.shape[1], torch.get_num_threads())
        return out


def compiled(flags: Sequence[str] = FLAGS) -> NetworkKernels | None:
    """The kernels built with ``flags`` (none without a compiler), not yet checked: see ``integer_ops``."""
    library = load(build(SOURCES, HEADERS, flags), SIGNATURES)
    return NetworkKernels(library) if library is not None else None
