"""The memory plan: what coding with a model will need, from its configuration alone.

``llmpipe models --plan MODEL`` prints it without loading any weights, so a
user learns before a long run (or a download) whether a model, batch and
context fit the machine. Every figure is computed from the architecture and
the engines' own layouts: weights as each engine holds them, the key/value
cache of ``batch x positions``, the largest temporaries of one pass, and the
mixer's history models. The activation figure is an estimate of the largest
live temporaries (within a small factor); the other parts are exact sizes of
the tensors the engines allocate.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmpipe.codec.context import ContextWindow
from llmpipe.codec.memory import BIAS_BYTES_PER_SYMBOL, HISTORY_BYTES_PER_SYMBOL
from llmpipe.defaults import DEFAULT_BATCH
from llmpipe.engine.exact_engine import HEAD_SLICE, TOKENS_PER_PASS
from llmpipe.engine.exact_transformer import QUERY_BLOCK, ExactKVCache
from llmpipe.engine.float_engine import DTYPES
from llmpipe.format.fields import MAX_WINDOW
from llmpipe.models.config import ModelConfig
from llmpipe.models.transformer import KVCache
from llmpipe.pipeline.blocks import MIN_BYTES_PER_SYMBOL
from llmpipe.tokenization import ESCAPE_SYMBOLS


def _matmul_shapes(config: ModelConfig) -> list[tuple[int, int]]:
    """(out, in) of every matmul of the network, the output head included."""
    c, inner, hd = config.hidden_size, config.intermediate_size, config.head_dim
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * hd
    mlp_in = 2 * inner if config.gated_mlp else inner
    layer = [(qkv, c), (c, config.num_attention_heads * hd), (mlp_in, c), (c, inner)]
    return layer * config.num_hidden_layers + [(config.vocab_size, c)]


def parameter_count(config: ModelConfig) -> int:
    """Weights of the checkpoint (norms and biases left out: under 0.1% of any supported model)."""
    matmuls = sum(n * k for n, k in _matmul_shapes(config))
    tied = config.vocab_size * config.hidden_size if config.tie_word_embeddings else 0
    embeddings = config.vocab_size * config.hidden_size
    positions = config.max_position_embeddings * config.hidden_size if config.positions == "learned" else 0
    return matmuls - tied + embeddings + positions


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per part, in the order they are printed, against an optional limit."""

    parts: dict[str, int]  # on the device the model runs on
    host_parts: dict[str, int]  # in the host's memory when that is another one (a GPU's host)
    limit: int | None
    where: str
    per_row: int  # the part of the total that grows with each row of the batch
    batch: int

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def fits(self) -> bool:
        return self.limit is None or self.total <= self.limit

    def largest_batch(self) -> int:
        """The most rows that fit the limit with everything else unchanged (0: not even one)."""
        if self.limit is None:
            return self.batch
        fixed = self.total - self.per_row * self.batch
        return max(0, (self.limit - fixed) // self.per_row) if self.per_row else self.batch

    def render(self) -> list[str]:
        lines = [f"  {name:<34} {_gib(size):>10}" for name, size in self.parts.items()]
        lines.append(f"  {'total on ' + self.where:<34} {_gib(self.total):>10}")
        lines += [f"  {name + ' (host)':<34} {_gib(size):>10}" for name, size in self.host_parts.items()]
        lines.append(f"fits: {self.verdict()}")
        return lines

    def verdict(self) -> str:
        """Whether it fits, in words, with what would fit when it does not."""
        if self.limit is None:
            return f"no limit given (-M); needs {_gib(self.total)} of {self.where} memory"
        if self.fits():
            return f"yes, {_gib(self.total)} of the {_gib(self.limit)} limit on {self.where}"
        if self.largest_batch():
            advice = f"--batch {self.largest_batch()} fits"
        else:
            advice = (
                "not even --batch 1 fits: try a smaller --context, float16 or 8-bit float weights, or another --device"
            )
        return f"NO, {_gib(self.total)} over the {_gib(self.limit)} limit on {self.where} ({advice})"


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


def plan_memory(
    config: ModelConfig,
    *,
    numerics: str = "exact",
    dtype: str = "float32",
    load_in_8bit: bool = False,
    batch: int = 64,
    positions: int = 1024,
    row_symbols: int = 0,
    limit: int | None = None,
    device: str = "cpu",
) -> MemoryPlan:
    """The memory of coding ``batch`` rows with contexts of ``positions`` (``row_symbols`` for the mixer).

    The model cache is read lazily (``models.cache.LazyWeights``), so only the
    weights an engine holds count: the exact engine's int8 weights, or the
    float engine's weights in ``dtype`` (int8 for the blocks' matmuls with
    ``load_in_8bit``, where the embeddings and output head stay in ``dtype``).
    """
    c, vocab = config.hidden_size, config.vocab_size
    shapes = _matmul_shapes(config)
    embeddings = (vocab + (config.max_position_embeddings if config.positions == "learned" else 0)) * c
    table_row = vocab * 4 + (vocab + ESCAPE_SYMBOLS) * 8 * 2  # logits, frequencies and their cumulative sums
    parts: dict[str, int] = {}
    host: dict[str, int] = {}
    if numerics == "exact":
        row_extra = 8 if config.norm == "layer" else 4  # a float32 scale, and a float32 bias where norms have one
        parts["weights, int8 + scales"] = sum(n * k + row_extra * n for n, k in shapes) + 4 * embeddings
        kv_row = positions * ExactKVCache.bytes_per_position(config)
        widest = max(n for n, _ in shapes[:-1])
        rows_per_pass = max(1, TOKENS_PER_PASS // positions)
        encoder = TOKENS_PER_PASS * widest * (4 + 8 + 8)  # float32 out, two int32 halves, float64 centring
        scores = rows_per_pass * config.num_attention_heads * QUERY_BLOCK * positions * 4 * 4
        tables = HEAD_SLICE * table_row
        parts["activations (estimate)"] = max(encoder + scores + tables, batch * table_row)
    else:
        size = DTYPES[dtype].itemsize
        if load_in_8bit:
            blocks = shapes[:-1]
            head = 0 if config.tie_word_embeddings else vocab * c
            parts[f"weights, int8 blocks + {dtype} embeddings"] = sum(n * k + 4 * n for n, k in blocks) + size * (
                embeddings + head
            )
        else:
            parts[f"weights, {dtype}"] = size * parameter_count(config)
        kv_row = positions * KVCache.bytes_per_position(config, DTYPES[dtype])
        step = batch * table_row
        prefill = TOKENS_PER_PASS * (max(n for n, _ in shapes[:-1]) + c * 4) * size
        attention = TOKENS_PER_PASS * config.num_attention_heads * positions * size * 2  # scores and softmax
        parts["activations (estimate)"] = max(step, prefill + attention)
    parts["KV cache"] = batch * kv_row
    per_row = kv_row
    if row_symbols:  # the mixer runs in the host's memory
        mixer_row = row_symbols * HISTORY_BYTES_PER_SYMBOL + (vocab + ESCAPE_SYMBOLS) * BIAS_BYTES_PER_SYMBOL
        (parts if device == "cpu" else host)["mixer history and adaptive bias"] = batch * mixer_row
        per_row += mixer_row if device == "cpu" else 0
    return MemoryPlan(parts, host, limit, device, per_row, batch)


def coding_plan(
    config: ModelConfig,
    *,
    numerics: str,
    dtype: str,
    load_in_8bit: bool,
    device: str,
    batch: int,
    chunk_size: int,
    context: ContextWindow,
    mixing: bool,
    limit: int | None,
    prompt: int = 0,
) -> MemoryPlan:
    """The memory plan of compressing with these settings, as the compressor bounds a group: a row holds at
    most ``chunk_size`` symbols, a context at most the window after the ``prompt``'s positions, the mixer one
    symbol per 1.5 bytes."""
    return plan_memory(
        config,
        numerics=numerics,
        dtype=dtype,
        load_in_8bit=load_in_8bit,
        batch=batch,
        positions=min(prompt + context.longest_context(chunk_size), config.max_position_embeddings),
        row_symbols=int(chunk_size / MIN_BYTES_PER_SYMBOL) if mixing else 0,
        limit=limit,
        device="cpu" if device == "cpu" else "cuda",
    )


def default_batch(plan: MemoryPlan, chunk_size: int) -> int:
    """:data:`DEFAULT_BATCH` rows, or as many as ``plan`` (made for that batch) fits in its limit; at least 1
    (when not even one fits, checking the plan of batch 1 says so)."""
    return max(1, min(DEFAULT_BATCH, MAX_WINDOW // chunk_size, plan.largest_batch()))
