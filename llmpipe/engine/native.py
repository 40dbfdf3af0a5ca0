"""The exact engine's compiled kernels (``kernels.c``): built once per machine, optional.

A decoding step reads every cached key and value of every row; with the
cache held as int8 instead of float32 that is a quarter of the memory
traffic, but torch has no batched int8 product on the CPU. The C kernels do
the two products of attention in exact integer arithmetic, so they return
the same integers as the float32 GEMMs they replace (``exact_transformer``).
They also quantise rows and split them into bytes before each matrix product
in one pass each (``integer_ops``), with the same float32 operations as
torch's half-dozen passes. Archives do not depend on whether they are used.

They are compiled with the system C compiler (``$CC``, else ``cc``) into
``<llmpipe cache>/kernels/`` on first use, keyed by the source, the compiler
and the CPU's features, and checked against torch on a known answer before
use. Without a compiler, on a failed build or check, on GPUs, or with
``LLMPIPE_NATIVE=0``, the engine runs the torch path instead: slower on the
CPU, same results.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable
from functools import cache, cached_property
from pathlib import Path

import torch

from llmpipe.models.cache import cache_dir

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
MAX_HEAD_DIM = 512
"""The kernels' scratch size (``kernels.c``); models with larger heads use the torch path."""
_INT64 = ctypes.c_int64


def _cpu_features() -> str:
    """The CPU's feature flags (``-march=native`` code must not run on a CPU without them)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(flags: tuple[str, ...] = FLAGS) -> Path | None:
    """The compiled library's path, compiling it if needed; None when it cannot be built. (The tests also
    build it with flags that leave out the 512-bit loops, as CPUs without AVX-512 run it.)"""
    compiler = os.environ.get("CC", "cc")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, " ".join(flags), _cpu_features()]).encode())
    target = cache_dir() / "kernels" / f"kernels-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            partial = Path(scratch) / target.name
            subprocess.run([compiler, *flags, str(SOURCE), "-o", str(partial)], capture_output=True, check=True)
            partial.replace(target)
    except (OSError, subprocess.CalledProcessError):
        return None
    return target


def _known_answer_ok(kernels: Kernels) -> bool:
    """Do the quantisation and byte split give torch's bits (ties at .5, all-zero rows, magnitudes from
    2^-30 to 2^30)? (``exact_transformer`` checks ``attention`` against its torch path per model.)"""
    from llmpipe.engine.integer_ops import ACT_MAX, quantize_rows_torch, split_bytes

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(9, 300, generator=generator) * torch.exp2(torch.randint(-30, 31, (9, 1), generator=generator))
    x[0] = 0.0
    x[1, :] = torch.arange(300) - 149.5  # ties
    quantised, amax = kernels.quantize_rows(x, ACT_MAX)
    reference, scale = quantize_rows_torch(x, ACT_MAX)
    quantise_ok = torch.equal(quantised, reference) and torch.equal(amax * (1.0 / ACT_MAX), scale)
    return quantise_ok and torch.equal(kernels.split_bytes(quantised), split_bytes(quantised).to(torch.int8))


class _Mixture:
    """The mixed tables' description as ``kernels.c`` reads it: row indices, LM weights, and the masses as
    one ascending (symbol, value) list per row, concatenated with each row's start."""

    def __init__(self, rows: list[int], lm_weights: list[float], masses: list[dict[int, float]]) -> None:
        ordered = [sorted(row.items()) for row in masses]
        self.index = torch.tensor(rows, dtype=torch.int64)
        self.weights = torch.tensor(lm_weights, dtype=torch.float64)
        self.start = torch.tensor([0] + [len(row) for row in ordered], dtype=torch.int64).cumsum(0)
        self.symbols = torch.tensor([v for row in ordered for v, _ in row] or [0], dtype=torch.int64)
        self.values = torch.tensor([m for row in ordered for _, m in row] or [0.0], dtype=torch.float64)
        self._freq: torch.Tensor | None = None  # the contiguous tables last pointed at, kept alive

    def pointers(self, freq: torch.Tensor) -> tuple[int, ...]:
        """``freq``, index, weights, starts, symbols, values, in ``find_mixed``'s order."""
        self._freq = freq.contiguous()
        return tuple(
            x.data_ptr() for x in (self._freq, self.index, self.weights, self.start, self.symbols, self.values)
        )


def fastest_seconds(product: Callable[[], object]) -> float:
    """The best of three timed calls of ``product`` after one to warm up (first-use checks, allocations):
    how the engine picks the faster of two products that give the same bits."""
    product()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        product()
        times.append(time.perf_counter() - start)
    return min(times)


class Kernels:
    """Typed calls into the compiled library, on torch's current number of threads. Tensors are CPU
    tensors; ``keys``/``values`` are (N, T, hd) int8 views whose last two dimensions are contiguous (rows
    may be further apart: a slice of the cache)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._library = library
        pointer, count = ctypes.c_void_p, ctypes.c_int
        signatures = {
            "quantize_rows": [pointer] * 3 + [_INT64] * 2 + [ctypes.c_float, count],
            "split_bytes": [pointer] * 2 + [_INT64] * 2 + [count],
            "attention": [pointer] * 7 + [_INT64, pointer] + [_INT64] * 7 + [count],
            "combine_products": [pointer] * 5 + [_INT64] * 2 + [count],
            "rms_norm_quantize": [pointer] * 3 + [_INT64] * 2 + [ctypes.c_float, ctypes.c_double, count],
            "prepare_qkv": [pointer]
            + [_INT64] * 7
            + [pointer] * 2
            + [ctypes.c_float] * 3
            + [pointer] * 6
            + [_INT64] * 2
            + [count],
            "activation": [pointer] * 2 + [_INT64, ctypes.c_float, pointer, _INT64, pointer] + [_INT64] * 2 + [count],
            "mixed_totals": [pointer] * 6 + [_INT64] * 2 + [count],
            "find_mixed": [pointer] * 11 + [_INT64] * 2 + [count],
            "frequency_tables": [pointer, ctypes.c_float, pointer, _INT64, ctypes.c_double, pointer]
            + [_INT64] * 3
            + [count],
            "bias_tables": [pointer] * 4 + [ctypes.c_int32, ctypes.c_double, pointer] + [_INT64] * 2 + [count],
            "bias_learn": [pointer] * 4 + [ctypes.c_int32] * 2 + [_INT64] * 2 + [count],
            "exact_matmul": [pointer] * 8 + [_INT64] * 3 + [count],
            "bias_run": [pointer] * 4
            + [ctypes.c_int32] * 2
            + [ctypes.c_double]
            + [pointer] * 3
            + [_INT64] * 2
            + [count],
            "code_mixed": [pointer] * 10 + [_INT64] * 2 + [count],
        }
        for name, arguments in signatures.items():
            function = getattr(library, name)
            function.restype = ctypes.c_int if name in ("attention", "exact_matmul") else None
            function.argtypes = arguments

    @cached_property
    def products_win(self) -> bool:
        """Is :meth:`exact_matmul` faster here than torch's int8 product of the split rows with
        :meth:`combine_products` (the same bits)? Timed once on a decoding step's shape: torch's CPU product
        is fast only where oneDNN has int8 instructions for it (AVX-512 VNNI, AMX); elsewhere it ran
        at 1 G multiply-adds per second, 60-90x slower than this kernel."""
        from llmpipe.engine.integer_ops import ACT_MAX, int8_products

        generator = torch.Generator().manual_seed(0)
        q = torch.randint(-ACT_MAX, ACT_MAX + 1, (64, 576), generator=generator).float()
        weight = torch.randint(-127, 128, (576, 576), generator=generator, dtype=torch.int8)
        row_scale, scale = torch.ones(64, 1), torch.ones(576)

        own = fastest_seconds(lambda: self.exact_matmul(q, row_scale, weight, scale, None))
        theirs = fastest_seconds(lambda: self.combine_products(int8_products(q, weight), row_scale, scale, None))
        return own < theirs

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
        """The last ``Q`` positions' attention over the first ``length`` cached ones (``kernels.c``):
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
        weight_t: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        mean: torch.Tensor | None = None,
        row_sums: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``ExactWeight``'s float32 output (M, N) for integer-valued float32 ``q`` (M, K) with (M, 1) row
        scales, int8 ``weight_t`` (K, N), (N,) scales and bias (or None); with ``mean`` (M, 1) and ``row_sums``
        (N,) float64 for LayerNorm rows. One int16 product per weight (``kernels.c``), the spec's bits."""
        q, row_scale, weight_t = q.contiguous(), row_scale.contiguous(), weight_t.contiguous()
        rows, depth = q.shape
        out = torch.empty(rows, weight_t.shape[1])
        if mean is not None:
            mean, row_sums = mean.contiguous(), row_sums.contiguous()
        tensors = (q, row_scale, weight_t, scale, bias, mean, row_sums, out)
        pointers = [t.data_ptr() if t is not None else None for t in tensors]
        if self._library.exact_matmul(*pointers, rows, depth, weight_t.shape[1], torch.get_num_threads()):
            raise MemoryError("exact_matmul: no memory for its scratch rows")
        return out

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

    def frequency_tables(
        self, logits: torch.Tensor, grid: float, exp: torch.Tensor, budget: float, extra: int
    ) -> torch.Tensor:
        """``coder.frequencies.frequency_tables`` of contiguous float32 ``logits`` (B, V) with the float64
        ``exp`` table -> (B, V + extra) float64."""
        rows, vocab = logits.shape
        freq = torch.empty(rows, vocab + extra, dtype=torch.float64)
        pointers = (logits.data_ptr(), grid, exp.data_ptr(), len(exp), budget, freq.data_ptr())
        self._library.frequency_tables(*pointers, rows, vocab, vocab + extra, torch.get_num_threads())
        return freq

    def bias_tables(
        self,
        freq: torch.Tensor,
        rows: list[int],
        bias: torch.Tensor,
        multipliers: torch.Tensor,
        limit: int,
        budget: float,
    ) -> torch.Tensor:
        """``adaptive_bias.AdaptiveBias.tables``: float64 ``freq`` (n, W), ``freq[k]`` biased by the int32
        ``bias`` row ``rows[k]`` -> (n, W) float64."""
        freq = freq.contiguous()
        n, width = freq.shape
        out = torch.empty(n, width, dtype=torch.float64)
        index = torch.tensor(rows, dtype=torch.int64)
        pointers = (freq.data_ptr(), index.data_ptr(), bias.data_ptr(), multipliers.data_ptr(), limit, budget)
        self._library.bias_tables(*pointers, out.data_ptr(), n, width, torch.get_num_threads())
        return out

    def bias_learn(
        self, tables: torch.Tensor, rows: list[int], symbols: list[int], bias: torch.Tensor, rate: int, limit: int
    ) -> None:
        """``adaptive_bias.AdaptiveBias.learn``: updates the int32 ``bias`` rows ``rows`` in place."""
        tables = tables.contiguous()
        index = torch.tensor(rows, dtype=torch.int64)
        coded = torch.tensor(symbols, dtype=torch.int64)
        pointers = (tables.data_ptr(), index.data_ptr(), coded.data_ptr(), bias.data_ptr(), rate, limit)
        self._library.bias_learn(*pointers, len(rows), tables.shape[1], torch.get_num_threads())

    def bias_run(
        self,
        freq: torch.Tensor,
        bias: torch.Tensor,
        symbols: list[int],
        multipliers: torch.Tensor,
        rate: int,
        limit: int,
        budget: float,
    ) -> tuple[torch.Tensor, list[float], list[float]]:
        """``adaptive_bias.AdaptiveBias.run``: the biased tables of ``freq`` (n, W) float64, one position
        after the other, learning into ``bias`` (one row's int32 (W,), contiguous, updated in place) after
        each; also each table's total and its symbol's frequency."""
        freq = freq.contiguous()
        n, width = freq.shape
        out = torch.empty(n, width, dtype=torch.float64)
        found = torch.empty(2, n, dtype=torch.float64)  # totals, sizes
        coded = torch.tensor(symbols, dtype=torch.int64)
        pointers = (freq.data_ptr(), bias.data_ptr(), multipliers.data_ptr(), coded.data_ptr(), rate, limit, budget)
        outputs = (out.data_ptr(), found[0].data_ptr(), found[1].data_ptr())
        self._library.bias_run(*pointers, *outputs, n, width, torch.get_num_threads())
        totals, sizes = found.tolist()
        return out, totals, sizes

    def code_mixed(
        self, freq: torch.Tensor, lm_weights: list[float], masses: list[dict[int, float]], symbols: list[int]
    ) -> tuple[list[int], list[int], list[int]]:
        """``coder.frequencies.code_positions`` of ``symbols`` in ``mixer.mix_tables``' mixed rows of ``freq``
        (n, W) float64, without building them: the starts, sizes and totals."""
        mixture = _Mixture(list(range(len(symbols))), lm_weights, masses)
        coded = torch.tensor(symbols, dtype=torch.int64)
        found = torch.empty(3, len(symbols), dtype=torch.float64)  # starts, sizes, totals
        pointers = (*mixture.pointers(freq), coded.data_ptr(), *(x.data_ptr() for x in found))
        self._library.code_mixed(*pointers, len(symbols), freq.shape[1], torch.get_num_threads())
        starts, sizes, totals = found.to(torch.int64).tolist()
        return starts, sizes, totals

    def row_totals(self, freq: torch.Tensor, rows: list[int]) -> list[float]:
        """The sums of ``rows`` of ``freq`` (B, V) float64 integers: ``mixed_totals`` unmixed."""
        return self._mixed_totals(freq, _Mixture(rows, [1.0] * len(rows), [{}] * len(rows))).tolist()

    def mixed_tables_search(
        self,
        freq: torch.Tensor,
        rows: list[int],
        lm_weights: list[float],
        masses: list[dict[int, float]],
        targets_for: Callable[[list[int]], list[int]],
    ) -> tuple[list[int], list[int], list[int], list[float]]:
        """``mixer.decode_symbols`` (which see) in two passes over ``freq`` (B, V) float64: the mixed rows'
        totals, then, for the targets ``targets_for(totals)``, the symbols, their starts and sizes, and
        their frequencies in ``freq``."""
        mixture = _Mixture(rows, lm_weights, masses)
        totals = self._mixed_totals(freq, mixture)
        targets = torch.tensor(targets_for(totals.to(torch.int64).tolist()), dtype=torch.float64)
        n, width = len(rows), freq.shape[1]
        symbols = torch.empty(n, dtype=torch.int64)
        found = torch.empty(3, n, dtype=torch.float64)  # starts, sizes, LM sizes
        pointers = (*mixture.pointers(freq), targets.data_ptr(), symbols.data_ptr(), *(x.data_ptr() for x in found))
        self._library.find_mixed(*pointers, n, width, torch.get_num_threads())
        whole = found[:2].to(torch.int64).tolist()
        return symbols.tolist(), whole[0], whole[1], found[2].tolist()

    def _mixed_totals(self, freq: torch.Tensor, mixture: _Mixture) -> torch.Tensor:
        """The totals of the mixed rows of ``freq`` (``kernels.c``'s ``mixed_totals``), float64 (rows,)."""
        totals = torch.empty(len(mixture.index), dtype=torch.float64)
        freq_at, index, weights, start, _, values = mixture.pointers(freq)
        arguments = (freq_at, index, weights, start, values, totals.data_ptr(), len(mixture.index), freq.shape[1])
        self._library.mixed_totals(*arguments, torch.get_num_threads())
        return totals

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


@cache
def _kernels() -> Kernels | None:
    if os.environ.get("LLMPIPE_NATIVE", "1") == "0":
        return None
    path = _build()
    if path is None:
        return None
    try:
        kernels = Kernels(ctypes.CDLL(str(path)))
        return kernels if _known_answer_ok(kernels) else None
    except (OSError, AttributeError):
        return None


def kernels_for(device: torch.device) -> Kernels | None:
    """The kernels for tensors on ``device``, or None (use the torch path)."""
    return _kernels() if device.type == "cpu" else None
