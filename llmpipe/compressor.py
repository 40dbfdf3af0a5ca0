"""Streaming compression: chunk the input, code groups of chunks, write blocks.

Memory is bounded by one group (``batch`` chunks) whatever the input length.
Each chunk becomes the smallest of an LLM, zstd or raw block, so data the
model is bad at (binary files, compressed data) costs at most a few bytes
more than zstd. With the float engine a group is coded again without the
chunks that lost, because the decoder must rerun exactly the batch the
encoder ran; the exact engine's tables do not depend on the batch, so its
losing chunks are simply dropped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import zstandard

from llmpipe import __version__
from llmpipe.codec import LlmCoder
from llmpipe.coder.frequencies import FREQ_BITS
from llmpipe.engine import create_engine
from llmpipe.engine.memory import check_kv_budget
from llmpipe.errors import LlmpipeError, UsageError
from llmpipe.format.container import (
    FLAG_GROUP_START,
    MAX_CHUNK_SIZE,
    MAX_ROWS,
    MAX_WINDOW,
    Block,
    BlockKind,
    crc32,
    end_record_bytes,
    stream_header_bytes,
)
from llmpipe.models import cache
from llmpipe.models.cache import LoadedModel
from llmpipe.tokenization import ESCAPE_SYMBOLS

DEFAULT_CHUNK_SIZE = 2048
DEFAULT_BATCH = 64
DEFAULT_THREADS = 2
MIN_BYTES_PER_SYMBOL = 1.5
"""Chunks that tokenise worse than this (binary data) skip the model: zstd wins there and it saves hours."""
ZSTD_LEVEL = 19


@dataclass
class Stats:
    """What a run did, for ``-v`` and the benchmarks."""

    input_bytes: int = 0
    output_bytes: int = 0
    blocks: dict[str, int] = field(default_factory=lambda: {k.name.lower(): 0 for k in BlockKind if k})
    llm_input_bytes: int = 0
    llm_payload_bytes: int = 0
    llm_symbols: int = 0
    ideal_bits: float = 0.0
    seconds: float = 0.0
    model_load_seconds: float = 0.0

    @property
    def bits_per_byte(self) -> float:
        return 8 * self.output_bytes / self.input_bytes if self.input_bytes else 0.0

    @property
    def coder_overhead(self) -> float:
        """Coded LLM payload bits over the model's ideal code length, minus one."""
        return 8 * self.llm_payload_bytes / self.ideal_bits - 1 if self.ideal_bits else 0.0


def utf8_safe_split(buffer: bytes) -> int:
    """Where to cut ``buffer`` so that no UTF-8 character is split (its length if nothing is open)."""
    for back in range(1, min(4, len(buffer)) + 1):
        byte = buffer[-back]
        if byte & 0xC0 == 0x80:  # continuation byte: keep looking for the lead byte
            continue
        if 0xC2 <= byte <= 0xF4:  # a lead byte that can start a valid character
            needed = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            if needed > back and len(buffer) > back:
                return len(buffer) - back
        break
    return len(buffer)


def iter_windows(source: BinaryIO, window_size: int) -> Iterator[bytes]:
    """Pieces of at most ``window_size`` bytes that never end inside a UTF-8 character."""
    carry = b""
    while True:
        buffer = carry
        while len(buffer) < window_size:
            more = source.read(window_size - len(buffer))
            if not more:
                break
            buffer += more
        if len(buffer) < window_size:  # end of input
            if buffer:
                yield buffer
            return
        cut = utf8_safe_split(buffer)
        carry = buffer[cut:]
        yield buffer[:cut]


def split_rows(symbols: list[int], spellings: list[bytes], rows: int) -> list[list[int]]:
    """Cut a window's symbols into ``rows`` runs of (nearly) equal length.

    Equal lengths keep every row of a lockstep group busy until the last step.
    A cut that would start a row with a UTF-8 continuation byte moves forward
    by up to three symbols, so rows start on character boundaries where the
    text allows it.
    """
    rows = max(1, min(rows, len(symbols)))
    cuts = [len(symbols) * k // rows for k in range(rows + 1)]
    for k in range(1, rows):
        cut = cuts[k]
        for _ in range(3):
            first = spellings[symbols[cut]][0] if cut < cuts[k + 1] - 1 else None
            if first is None or not 0x80 <= first <= 0xBF:
                break
            cut += 1
        cuts[k] = cut
    return [symbols[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]


class Compressor:
    """Holds a loaded model and compresses any number of streams with it."""

    def __init__(
        self,
        model: str | LoadedModel | None = None,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        batch: int = DEFAULT_BATCH,
        threads: int = DEFAULT_THREADS,
        numerics: str = "exact",
    ) -> None:
        if not 16 <= chunk_size <= MAX_CHUNK_SIZE:
            raise UsageError(f"chunk size must be between 16 and {MAX_CHUNK_SIZE} bytes")
        if not 1 <= batch <= MAX_ROWS:
            raise UsageError(f"batch must be between 1 and {MAX_ROWS}")
        if batch * chunk_size > MAX_WINDOW:
            raise UsageError(f"batch x chunk size must stay within {MAX_WINDOW >> 20} MiB")
        if not 1 <= threads <= 256:
            raise UsageError("threads must be between 1 and 256")
        self.model = model if isinstance(model, LoadedModel) else cache.load(model)
        self.chunk_size = chunk_size
        self.batch = batch
        self.threads = threads
        engine = create_engine(numerics, self.model, threads, batch)
        worst_positions = min(chunk_size, engine.max_positions)  # a row never has more symbols than chunk_size
        try:  # refuse now what a group of this size could need, not hours into the input
            check_kv_budget(batch, worst_positions, engine.max_positions, engine.kv_bytes_per_position)
        except LlmpipeError as exc:
            raise UsageError(f"--batch {batch} with --chunk-size {chunk_size}: {exc}") from None
        self._coder = LlmCoder(engine, self.model.tokenizer)
        self._zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL)

    def header(self) -> dict:
        return {
            "llmpipe": __version__,
            "model": self.model.identity(),
            "chunk_size": self.chunk_size,
            "prime_token": self.model.tokenizer.prime_token,
            "coder": {"name": "range64", "freq_bits": FREQ_BITS, "escape_symbols": ESCAPE_SYMBOLS},
            "batch": self.batch,
            "numerics": self._coder.engine.numerics(),
            "steering": None,
        }

    def compress_stream(
        self, source: BinaryIO, sink: BinaryIO, progress: Callable[[Stats], None] | None = None
    ) -> Stats:
        """Compress all of ``source`` into one llmpipe stream written to ``sink``."""
        stats = Stats(model_load_seconds=self.model.load_seconds)
        started = time.perf_counter()
        head = stream_header_bytes(self.header())
        sink.write(head)
        stats.output_bytes += len(head)
        count = 0
        for window in iter_windows(source, self.chunk_size * self.batch):
            count += self._write_window(window, sink, stats)
            stats.seconds = time.perf_counter() - started
            if progress:
                progress(stats)
        tail = end_record_bytes(count, stats.input_bytes)
        sink.write(tail)
        stats.output_bytes += len(tail)
        stats.seconds = time.perf_counter() - started
        return stats

    def _write_window(self, window: bytes, sink: BinaryIO, stats: Stats) -> int:
        """Code one window as up to ``batch`` rows (chunks); returns the number of blocks written."""
        tokenizer = self.model.tokenizer
        rows = -(-len(window) // self.chunk_size)
        symbols = split_rows(tokenizer.encode(window), tokenizer.spellings, rows)
        chunks = [tokenizer.decode(row) for row in symbols]
        limit = self._coder.engine.max_positions
        candidates = [
            i
            for i, c in enumerate(chunks)
            if len(symbols[i]) <= limit and len(c) >= MIN_BYTES_PER_SYMBOL * len(symbols[i])
        ]
        plain_size = {i: min(len(self._zstd.compress(chunks[i])), len(chunks[i])) for i in candidates}
        llm_blocks: dict[int, Block] = {}
        ideal: dict[int, float] = {}
        while candidates:
            coded = self._coder.encode_group([symbols[i] for i in candidates])
            llm_blocks = {
                i: Block(BlockKind.LLM, 0, len(chunks[i]), payload, len(symbols[i]), crc32(chunks[i]))
                for i, payload in zip(candidates, coded.payloads, strict=True)
            }
            ideal = dict(zip(candidates, coded.ideal_bits, strict=True))
            winners = [i for i in candidates if len(llm_blocks[i].payload) < plain_size[i]]
            # the float engine's decoder must replay exactly the batch coded: code the winners again
            replay = winners != candidates and not self._coder.engine.full_sequence
            candidates = winners
            if not replay:
                break
        if candidates:
            first = llm_blocks[candidates[0]]
            first.flags, first.group_rows = FLAG_GROUP_START, len(candidates)
        chosen = set(candidates)
        blocks: list[Block] = []
        plain_run: list[bytes] = []  # consecutive chunks the model did not win, stored as one block
        for i, chunk in enumerate(chunks):
            if i not in chosen:
                plain_run.append(chunk)
                continue
            if plain_run:
                blocks.append(self._plain_block(b"".join(plain_run)))
                plain_run = []
            blocks.append(llm_blocks[i])
            stats.llm_input_bytes += len(chunk)
            stats.llm_payload_bytes += len(llm_blocks[i].payload)
            stats.llm_symbols += llm_blocks[i].token_count
            stats.ideal_bits += ideal[i]
        if plain_run:
            blocks.append(self._plain_block(b"".join(plain_run)))
        for block in blocks:
            data = block.to_bytes()
            sink.write(data)
            stats.output_bytes += len(data)
            stats.input_bytes += block.original_size
            stats.blocks[block.kind.name.lower()] += 1
        return len(blocks)

    def _plain_block(self, data: bytes) -> Block:
        """The smaller of a zstd and a raw block for ``data``."""
        packed = self._zstd.compress(data)
        if len(packed) < len(data):
            return Block(BlockKind.ZSTD, 0, len(data), packed, 0, crc32(data))
        return Block(BlockKind.RAW, 0, len(data), data, 0, crc32(data))

    def compress(self, data: bytes) -> bytes:
        """Compress a bytes object in memory."""
        import io

        sink = io.BytesIO()
        self.compress_stream(io.BytesIO(data), sink)
        return sink.getvalue()
