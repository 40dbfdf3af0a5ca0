"""Block making: a window cut into rows, each row LLM-coded, zstd or raw, whichever is smallest.

A window becomes one block (FORMAT.md section 3), its LLM rows the block's
lockstep group. Data the model is bad at (binary files, compressed data)
costs at most a few bytes more than zstd. With the float engine a group is coded again
without the rows that lost, because the decoder must rerun exactly the batch
the encoder ran; the exact engine's tables do not depend on the batch, so
its losing rows are simply dropped.
"""

from __future__ import annotations

import zstandard

from llmpipe.codec.coder import LlmCoder
from llmpipe.codec.context import ContextWindow
from llmpipe.format.block import ZSTD_FORMAT, Block, Row, RowKind
from llmpipe.format.fields import crc32
from llmpipe.pipeline.stats import Stats

MIN_BYTES_PER_SYMBOL = 1.5
"""Chunks that tokenise worse than this (binary data) skip the model: zstd wins there and it saves hours."""
ZSTD_LEVEL = 19
MIN_ROW_BYTES = 8192
"""Inputs shorter than a window are cut into up to ``batch`` rows of at least this many bytes.

Measured on 128 KB of enwik8 (64, 32 or 16 rows): 2 KB rows 1.203 bpb and
0.82 KB/s decoding, 4 KB 1.104 and 0.56, 8 KB 1.047 and 0.46. Issue 6 asks
that no text code worse than with 8 KB chunks, so rows are never shorter;
the price is decoder parallelism on inputs under 512 KB."""
TWO_ROWS_FROM = 4096
"""...except that a window of this many bytes or more that would be one row is also coded as two (of 2 KB or
more), decoded in lockstep, and kept so when that costs at most TWO_ROWS_MAX_COST more bytes: a small input
decodes one symbol of each row a step, and a step of two rows costs little more than one. Measured
(``BENCHMARKS.md``, "small-files", 4 KB prefixes of three corpus texts): two rows decoded in 0.64 of one
row's time, for 4.7-5.6% more bytes on two texts and 16% on enwik8's first 4 KB (its XML header repeats
itself, which one row's history exploits)."""
TWO_ROWS_MAX_COST = 0.05


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


class WindowCoder:
    """Codes windows into blocks with one coder and the stream's settings."""

    def __init__(self, coder: LlmCoder, context: ContextWindow, batch: int, chunk_size: int, mixer_version: int):
        self.coder = coder
        self.context = context
        self.batch = batch
        self.chunk_size = chunk_size
        self.mixer_version = mixer_version
        """What the archive's tables are mixed with (``mixer.VERSIONS``); a benchmark may set an older one."""
        self.two_rows_from = TWO_ROWS_FROM
        """Where a one-row window is tried as two (a benchmark cutting rows itself sets it out of reach)."""

    def code_window(self, window: bytes, stats: Stats) -> Block:
        """Code one window as up to ``batch`` rows (chunks): its block (TWO_ROWS_FROM: two rows where one
        would do, when they cost little)."""
        rows = self.rows_for(len(window))
        block, coding = self._block(window, rows)
        if rows == 1 and self.batch > 1 and len(window) >= self.two_rows_from:
            two, two_coding = self._block(window, 2)
            if len(two.to_bytes()) <= (1 + TWO_ROWS_MAX_COST) * len(block.to_bytes()):
                block, coding = two, two_coding
        stats.add_coding(coding)
        return block

    def _block(self, window: bytes, rows: int) -> tuple[Block, Stats]:
        """The window cut into ``rows`` rows, each the smallest of LLM, zstd or raw: its block, and what its
        LLM rows coded (``Stats``' LLM fields)."""
        tokenizer = self.coder.tokenizer
        symbols = split_rows(tokenizer.encode(window), tokenizer.spellings, rows)
        chunks = [tokenizer.decode(row) for row in symbols]
        limit = self.coder.engine.max_positions
        candidates = [
            i
            for i, c in enumerate(chunks)
            if self.context.longest_context(len(symbols[i])) <= limit
            and len(c) >= MIN_BYTES_PER_SYMBOL * len(symbols[i])
        ]
        plain_size = {i: len(self.plain_row(chunks[i]).payload) for i in candidates}
        llm_rows: dict[int, Row] = {}
        ideal: dict[int, float] = {}
        while candidates:
            coded = self.coder.encode_group([symbols[i] for i in candidates], self.context, self.mixer_version)
            llm_rows = {
                i: Row(RowKind.LLM, payload, len(symbols[i]))
                for i, payload in zip(candidates, coded.payloads, strict=True)
            }
            ideal = dict(zip(candidates, coded.ideal_bits, strict=True))
            winners = [i for i in candidates if len(llm_rows[i].payload) < plain_size[i]]
            # the float engine's decoder must replay exactly the batch coded: code the winners again
            replay = winners != candidates and not self.coder.engine.full_sequence
            candidates = winners
            if not replay:
                break
        chosen = set(candidates)
        block_rows: list[Row] = []
        plain_run: list[bytes] = []  # consecutive chunks the model did not win, stored as one row
        for i, chunk in enumerate(chunks):
            if i not in chosen:
                plain_run.append(chunk)
                continue
            if plain_run:
                block_rows.append(self.plain_row(b"".join(plain_run)))
                plain_run = []
            block_rows.append(llm_rows[i])
        if plain_run:
            block_rows.append(self.plain_row(b"".join(plain_run)))
        block = Block(block_rows, len(window), crc32(window), len(chosen))
        coding = Stats()
        if chosen and len(block_rows) > 1:  # LLM rows cut zstd's runs apart: keep them only if that still pays
            whole = Block([self.plain_row(window)], len(window), block.checksum)
            if len(whole.to_bytes()) <= len(block.to_bytes()):
                return whole, coding
        for i in sorted(chosen):
            coding.llm_input_bytes += len(chunks[i])
            coding.llm_payload_bytes += len(llm_rows[i].payload)
            coding.llm_symbols += llm_rows[i].token_count
            coding.ideal_bits += ideal[i]
        return block, coding

    def rows_for(self, size: int) -> int:
        """How many rows a window of ``size`` bytes is cut into: one per ``chunk_size`` bytes, but a shorter
        input into up to ``batch`` rows of at least MIN_ROW_BYTES: more rows decode together, none so short
        that its context suffers."""
        return min(self.batch, max(-(-size // self.chunk_size), size // MIN_ROW_BYTES))

    def plain_row(self, data: bytes) -> Row:
        """The smaller of a zstd and a raw row for ``data``."""
        packed = self._smallest_zstd(data)
        if len(packed) < len(data):
            return Row(RowKind.ZSTD, packed)
        return Row(RowKind.RAW, data, original_size=len(data))

    def _smallest_zstd(self, data: bytes) -> bytes:
        """The smaller of two magicless zstd frames of ``data``: with its size declared, and streamed without.

        libzstd tunes its parameters down when it knows the size is small,
        which on some binary data costs 10-15%; the streamed frame keeps the
        full level-19 search.
        """
        sized = self._zstd(len(data)).compress(data)
        streaming = self._zstd(0).compressobj()
        unsized = streaming.compress(data) + streaming.flush()
        return unsized if len(unsized) < len(sized) else sized

    @staticmethod
    def _zstd(size: int) -> zstandard.ZstdCompressor:
        """Level 19 tuned for ``size`` bytes (0: unknown), writing frames without the magic number."""
        parameters = zstandard.ZstdCompressionParameters.from_level(ZSTD_LEVEL, source_size=size, format=ZSTD_FORMAT[3])
        return zstandard.ZstdCompressor(compression_params=parameters)
