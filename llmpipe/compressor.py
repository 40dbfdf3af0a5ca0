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

import functools
import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

import torch
import zstandard

from llmpipe import __version__, mixer
from llmpipe.codec import ContextWindow, LlmCoder
from llmpipe.coder.frequencies import FREQ_BITS
from llmpipe.defaults import (
    ALL_THREADS,
    DEFAULT_BATCH,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_CONTEXT,
    DEFAULT_OVERLAP,
    DEFAULT_STEER,
    DEFAULT_STEER_EPOCHS,
    DEFAULT_STEER_SECONDS,
    resolve_threads,
)
from llmpipe.engine import create_engine, usable_device
from llmpipe.engine.memory import available_memory, check_history_budget, check_kv_budget
from llmpipe.engine.plan import MemoryPlan, plan_memory
from llmpipe.errors import ArchiveError, LlmpipeError, TruncatedArchiveError, UsageError
from llmpipe.format.container import (
    FLAG_GROUP_START,
    MAX_CHUNK_SIZE,
    MAX_ROWS,
    MAX_WINDOW,
    Block,
    BlockKind,
    ContainerReader,
    GroupTracker,
    StreamWriter,
    crc32,
    stream_header_bytes,
)
from llmpipe.models import cache
from llmpipe.models.cache import LoadedModel
from llmpipe.models.config import ModelConfig
from llmpipe.models.transformer import Transformer
from llmpipe.steering.prompt import (
    SteeringPrompt,
    embedding_rms,
    learn_tokens,
    learned_prompt,
    parse_steer,
    prompt_from_record,
)
from llmpipe.steering.quantise import candidates
from llmpipe.steering.select import Estimate, choose, held_out_bits, rank
from llmpipe.steering.train import LearnedVector, learn_vector
from llmpipe.tokenization import ESCAPE_SYMBOLS

MIN_BYTES_PER_SYMBOL = 1.5
"""Chunks that tokenise worse than this (binary data) skip the model: zstd wins there and it saves hours."""
ZSTD_LEVEL = 19
MIN_ROW_BYTES = 8192
"""Inputs shorter than a window are cut into up to ``batch`` rows of at least this many bytes.

Measured on 128 KB of enwik8 (64, 32 or 16 rows): 2 KB rows 1.203 bpb and
0.82 KB/s decoding, 4 KB 1.104 and 0.56, 8 KB 1.047 and 0.46. Issue 6 asks
that no text code worse than with 8 KB chunks, so rows are never shorter;
the price is decoder parallelism on inputs under 512 KB."""


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
    damaged: list[str] = field(default_factory=list)  # blocks left out by a decoder told to keep going

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


TRAIN_ROWS, TRAIN_TOKENS = 8, 256
"""A learned prompt trains on this many rows of this many tokens, spread across the first window."""
HELD_OUT_ROWS, HELD_OUT_TOKENS = 4, 1024
"""... and its codings are measured on rows the training did not see, as long as the default context."""
AUTO_TOKENS = 1
"""``--steer auto`` tries one virtual token: the cheapest vector (C values)."""
AUTO_MIN_BYTES = 32 * 1024 * 1024
"""``auto`` trains only on inputs of at least this many bytes (the writer reads that far ahead before the
stream header), where its work is a few percent of the coding's. On a 2 MiB first window the work is fixed:
20 training steps of about 15 s and 8 held-out evaluations of 33-64 s on this project's 2-core machine,
about 10-14 minutes, while coding runs at about 1.3 KB/s there (BENCHMARKS.md, throughput): 32 MiB take
about 7 hours, so the decision costs about 3% of them, and nothing at all on smaller inputs. Below it a
vector rarely repays even its bits: one token costs about 2,000 header bits and saved 2-3 bits per KB of
enwik8 and calgary/news, about 10 on world192.txt (STEERING.md)."""


def sample_rows(window: bytes, tokenizer, count: int, tokens: int, skip: int = 0) -> list[list[int]]:
    """Up to ``count`` rows of at most ``tokens`` model inputs (each after the prime token), starting at
    ``skip`` and even intervals across ``window``."""
    rows = []
    stride = max(1, len(window) // count)
    for a in range(skip, len(window), stride):
        piece = window[a : a + 4 * tokens]
        piece = piece[: utf8_safe_split(piece)] if a + len(piece) < len(window) else piece
        symbols = tokenizer.encode(piece)[:tokens]
        if len(symbols) > 1:
            rows.append([tokenizer.prime_token] + [tokenizer.model_input(x) for x in symbols])
    return rows[:count]


@dataclass(frozen=True)
class SteeringChoice:
    """What ``learn:N``/``auto`` learned on a first window, every option's projected size, and the pick."""

    vector: LearnedVector
    estimates: list[Estimate]
    chosen: Estimate


def held_out_rows(window: bytes, tokenizer) -> list[list[int]]:
    """The rows a learned prompt's codings are measured on: between the training rows, which start at
    multiples of ``len(window) / TRAIN_ROWS``."""
    return sample_rows(window, tokenizer, HELD_OUT_ROWS, HELD_OUT_TOKENS, len(window) // (2 * TRAIN_ROWS))


class Compressor:
    """Holds a loaded model and compresses any number of streams with it."""

    def __init__(
        self,
        model: str | LoadedModel | None = None,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        batch: int | None = None,
        threads: int = ALL_THREADS,
        numerics: str = "exact",
        context: int = DEFAULT_CONTEXT,
        overlap: int = DEFAULT_OVERLAP,
        mixing: bool = True,
        device: str = "cpu",
        dtype: str = "float32",
        load_in_8bit: bool = False,
        memory: int | None = None,
        log: Callable[[str], None] | None = None,
        steer: str = DEFAULT_STEER,
        steer_epochs: int = DEFAULT_STEER_EPOCHS,
        steer_seconds: float = DEFAULT_STEER_SECONDS,
    ) -> None:
        """``batch`` None: :data:`DEFAULT_BATCH` rows, or as many as the memory plan fits in ``memory``
        (bytes; default: what ``device`` has available). An explicit batch that does not fit is refused
        before any weights are read. ``log`` receives the plan, line by line (``-v``), and the steering
        training's progress. ``steer`` is a ``--steer`` value: fixed (``steering.prompt.parse_steer``) or
        ``learn:N``, trained on each stream's first window within ``steer_epochs`` and ``steer_seconds``."""
        if not 16 <= chunk_size <= MAX_CHUNK_SIZE:
            raise UsageError(f"chunk size must be between 16 and {MAX_CHUNK_SIZE} bytes")
        if batch is not None and not 1 <= batch <= MAX_ROWS:
            raise UsageError(f"batch must be between 1 and {MAX_ROWS}")
        if batch is not None and batch * chunk_size > MAX_WINDOW:
            raise UsageError(f"batch x chunk size must stay within {MAX_WINDOW >> 20} MiB")
        threads = resolve_threads(threads)
        try:
            self.context = ContextWindow(context, overlap if context else 0)
        except ValueError as exc:
            raise UsageError(f"--context {context} --overlap {overlap}: {exc}") from None
        device = usable_device(device)
        self.model = model if isinstance(model, LoadedModel) else cache.load(model)  # maps the weights, reads none
        settings = {"numerics": numerics, "dtype": dtype, "load_in_8bit": load_in_8bit, "device": device}
        limit = memory if memory is not None else available_memory(device)
        self._auto = steer == "auto"
        self._learn = AUTO_TOKENS if self._auto else learn_tokens(steer)
        self._learn_budget = (steer_epochs, steer_seconds)
        self._log = log
        self.prompt = None if self._learn else parse_steer(steer, self.model)
        plan_of = functools.partial(
            coding_plan,
            self.model.config,
            chunk_size=chunk_size,
            context=self.context,
            prompt=self._learn or (self.prompt.length if self.prompt else 0),
            mixing=mixing,
            limit=limit,
        )
        if batch is None:
            batch = default_batch(plan_of(batch=DEFAULT_BATCH, **settings), chunk_size)
        plan = plan_of(batch=batch, **settings)
        for line in plan.render() if log else ():
            log(f"plan: {line}")
        if not plan.fits():
            raise UsageError(f"{self.model.name} with --batch {batch}: {plan.verdict()}")
        self.chunk_size = chunk_size
        self.batch = batch
        self.mixer_version = mixer.VERSION if mixing else 0
        """What the archive's tables are mixed with (``mixer.VERSIONS``); a benchmark may set an older one."""
        self.threads = threads
        engine = create_engine(numerics, self.model, threads, batch, device, dtype, load_in_8bit)
        engine.set_prompt(self.prompt)
        # a row never has more symbols than chunk_size, nor a context more than the window
        worst_positions = min(self.context.longest_context(chunk_size), engine.max_positions)
        try:  # refuse now what a group of this size could need, not hours into the input
            check_kv_budget(batch, worst_positions, engine.max_positions, engine.kv_bytes_per_position, engine.kv_limit)
            if mixing:  # LLM rows hold at most one symbol per MIN_BYTES_PER_SYMBOL bytes
                check_history_budget(int(batch * chunk_size / MIN_BYTES_PER_SYMBOL))
        except LlmpipeError as exc:
            raise UsageError(f"--batch {batch} with --chunk-size {chunk_size}: {exc}") from None
        self._coder = LlmCoder(engine, self.model.tokenizer)
        self._zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL)

    def begin_stream(self) -> None:
        """A new stream: with ``learn:N`` its prompt is learned again, from its own first window."""
        if self._learn:
            self.set_prompt(None)

    @property
    def steer_lookahead(self) -> int:
        """How many bytes of a stream's input the writer reads before its header: ``auto`` decides on the
        input's size (:data:`AUTO_MIN_BYTES`), the other modes on the first window alone."""
        return AUTO_MIN_BYTES if self._auto else 0

    def steer_on(self, sample: bytes, seen: int | None = None) -> SteeringChoice | None:
        """Before the header is written: learn the stream's prompt on ``sample`` (``learn:N`` and ``auto``),
        code it every way ``steering.quantise`` offers, and keep the coding with the smallest projected total
        (``auto``: or none, ``steering.select.choose``). ``seen``: how many bytes of the input were read
        ahead (at least ``sample``). Returns what was learned and measured, if anything."""
        if not self._learn or not sample:
            return None
        log = self._log or (lambda line: None)
        if self._auto and max(len(sample), seen or 0) < AUTO_MIN_BYTES:
            log(f"steering: auto: none (input under {AUTO_MIN_BYTES} bytes: training would not repay its time)")
            return None
        started = time.perf_counter()
        tokenizer = self.model.tokenizer
        train, held_out = sample_rows(sample, tokenizer, TRAIN_ROWS, TRAIN_TOKENS), held_out_rows(sample, tokenizer)
        if not train or not held_out:  # too little text to learn from: no prompt
            return None
        network = Transformer(self.model.config, self.model.weights, torch.float32)
        held_bytes = sum(len(tokenizer.spellings[x]) for row in held_out for x in row[1:])
        projection = len(sample) / max(1, held_bytes)
        plain_bits = held_out_bits(network, held_out, None)
        if self._auto and plain_bits * projection >= (zstd_bits := 8 * len(self._zstd.compress(sample))):
            log(f"steering: auto: none (the model codes this window no better than zstd's {zstd_bits} bits)")
            return None  # its rows would go to zstd blocks
        epochs, seconds = self._learn_budget
        vector = learn_vector(network, train, self._learn, epochs=epochs, seconds=seconds, log=self._log)
        log(
            f"steering: learned {self._learn} tokens in {vector.epochs} epochs: training rows "
            f"{vector.sample_bits_before:.0f} -> {vector.sample_bits_after:.0f} bits"
        )
        estimates = rank(
            network,
            held_out,
            candidates(vector.values, embedding_rms(network.embed)),
            lambda coded: self.header_bits(learned_prompt(coded) if coded else None),
            projection,
            plain_bits,
        )
        for e in estimates:
            log(
                f"steering: {e.label}: vector {e.vector_bits} bits, held-out {e.held_out_bits:.0f} bits, "
                f"projected total {e.total:.0f} bits"
            )
        chosen = choose(estimates, self._auto)
        none = next(e for e in estimates if e.coded is None)
        log(f"steering: {'auto: ' if self._auto else ''}chose {chosen.label}")
        log(
            f"steering: the decision took {time.perf_counter() - started:.0f} s for a projected saving of "
            f"{(none.total - chosen.total) / 8:,.0f} bytes on this window"
        )
        self.set_prompt(learned_prompt(chosen.coded) if chosen.coded else None)
        return SteeringChoice(vector, estimates, chosen)

    def header_bits(self, prompt: SteeringPrompt | None) -> int:
        """What ``prompt`` adds to the stream header, in bits: the price it pays in every archive."""
        header = self.header()
        with_prompt = {**header, "steering": prompt.record() if prompt else None}
        return 8 * (len(stream_header_bytes(with_prompt)) - len(stream_header_bytes({**header, "steering": None})))

    def set_prompt(self, prompt: SteeringPrompt | None) -> None:
        """Code the following windows with ``prompt`` (with ``learn:N``/``auto``: until the next stream)."""
        self.prompt = prompt
        self._coder.engine.set_prompt(prompt)

    def header(self) -> dict:
        return {
            "llmpipe": __version__,
            "model": self.model.identity(),
            "chunk_size": self.chunk_size,
            "prime_token": self.model.tokenizer.prime_token,
            "coder": {"name": "range64", "freq_bits": FREQ_BITS, "escape_symbols": ESCAPE_SYMBOLS},
            "batch": self.batch,
            "context": self.context.record(),
            "mixer": mixer.record(self.mixer_version),
            "numerics": self._coder.engine.numerics(),
            "steering": self.prompt.record() if self.prompt else None,
        }

    def writer(
        self, sink: BinaryIO, progress: Callable[[Stats], None] | None = None, resume: StreamWriter | None = None
    ) -> CompressionWriter:
        """An incremental compressor writing one stream to ``sink``; ``resume`` continues a partial stream."""
        return CompressionWriter(self, sink, progress, resume)

    def compress_stream(
        self,
        source: BinaryIO,
        sink: BinaryIO,
        progress: Callable[[Stats], None] | None = None,
        resume: StreamWriter | None = None,
    ) -> Stats:
        """Compress all of ``source`` into one llmpipe stream written to ``sink``."""
        writer = self.writer(sink, progress, resume)
        while data := source.read(self.window_size):
            writer.write(data)
        return writer.close()

    def resume(self, partial: BinaryIO, name: str, source: BinaryIO) -> StreamWriter | None:
        """Continue an interrupted compression: keep the complete groups of ``partial`` (opened ``r+b``).

        Every kept block's checksum is compared with the input's bytes at its
        place (the input must be the same seekable file), the partial archive
        is cut after the last complete group, and ``source`` is positioned at
        the first byte not yet coded. Returns the writer to continue with, or
        None when not even the stream header was complete (start afresh).
        """
        reader = ContainerReader(partial, name)
        try:
            header = reader.read_stream_header(first=True)
        except TruncatedArchiveError:  # killed before the header was out
            partial.seek(0)
            partial.truncate()
            return None
        except ArchiveError as exc:
            raise UsageError(f"{name}: cannot resume from it ({exc})") from None
        if self._learn:  # the partial archive's prompt was learned on this input: keep it
            config = self.model.config
            self.set_prompt(prompt_from_record(header.get("steering"), config.hidden_size, config.vocab_size))
        mine = self.header()
        differ = sorted(k for k in set(mine) | set(header) if k != "llmpipe" and mine.get(k) != header.get(k))
        if differ:
            raise UsageError(f"{name}: made with other settings ({', '.join(differ)}); cannot resume it")
        tracker = GroupTracker(self.batch)
        kept = StreamWriter(partial, reader.header_size, size=reader.offset)
        clean_offset = reader.offset
        while True:
            try:
                block = reader.read_block(self.window_size, self.batch)
                if block is None:
                    break
                tracker.add(block, reader.blocks)
            except ArchiveError:
                break  # the interrupted write: everything before it is kept
            source.seek(reader.total - block.original_size)
            if crc32(source.read(block.original_size)) != block.checksum:
                start = reader.total - block.original_size
                raise UsageError(f"{name}: the input differs from what it holds at byte {start}; cannot resume it")
            if not tracker.open:
                kept.block_count, kept.total_size = reader.blocks, reader.total
                kept.entries = bytearray(reader.entries)
                clean_offset = kept.size = reader.offset
        partial.seek(clean_offset)
        partial.truncate()
        source.seek(kept.total_size)
        return kept

    @property
    def window_size(self) -> int:
        """Bytes coded together: ``batch`` chunks."""
        return self.chunk_size * self.batch

    def code_window(self, window: bytes, stats: Stats) -> list[Block]:
        """Code one window as up to ``batch`` rows (chunks): its blocks, in order."""
        tokenizer = self.model.tokenizer
        # rows of chunk_size bytes, but a shorter input is cut into up to batch rows of at least
        # MIN_ROW_BYTES: more rows decode together, none so short that its context suffers
        rows = min(self.batch, max(-(-len(window) // self.chunk_size), len(window) // MIN_ROW_BYTES))
        symbols = split_rows(tokenizer.encode(window), tokenizer.spellings, rows)
        chunks = [tokenizer.decode(row) for row in symbols]
        limit = self._coder.engine.max_positions
        candidates = [
            i
            for i, c in enumerate(chunks)
            if self.context.longest_context(len(symbols[i])) <= limit
            and len(c) >= MIN_BYTES_PER_SYMBOL * len(symbols[i])
        ]
        plain_size = {i: min(len(self._smallest_zstd(chunks[i])), len(chunks[i])) for i in candidates}
        llm_blocks: dict[int, Block] = {}
        ideal: dict[int, float] = {}
        while candidates:
            coded = self._coder.encode_group([symbols[i] for i in candidates], self.context, self.mixer_version)
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
        if plain_run:
            blocks.append(self._plain_block(b"".join(plain_run)))
        if chosen and len(blocks) > 1:  # LLM rows cut zstd's runs apart: keep them only if that still pays
            whole = self._plain_block(window)
            if len(whole.to_bytes()) <= sum(len(b.to_bytes()) for b in blocks):
                return [whole]
        for i in sorted(chosen):
            stats.llm_input_bytes += len(chunks[i])
            stats.llm_payload_bytes += len(llm_blocks[i].payload)
            stats.llm_symbols += llm_blocks[i].token_count
            stats.ideal_bits += ideal[i]
        return blocks

    def _plain_block(self, data: bytes) -> Block:
        """The smaller of a zstd and a raw block for ``data``."""
        packed = self._smallest_zstd(data)
        if len(packed) < len(data):
            return Block(BlockKind.ZSTD, 0, len(data), packed, 0, crc32(data))
        return Block(BlockKind.RAW, 0, len(data), data, 0, crc32(data))

    def _smallest_zstd(self, data: bytes) -> bytes:
        """The smaller of two zstd frames of ``data``: with its size declared, and streamed without it.

        libzstd tunes its parameters down when it knows the size is small,
        which on some binary data costs 10-15%; the streamed frame keeps the
        full level-19 search.
        """
        sized = self._zstd.compress(data)
        streaming = self._zstd.compressobj()
        unsized = streaming.compress(data) + streaming.flush()
        return unsized if len(unsized) < len(sized) else sized

    def compress(self, data: bytes) -> bytes:
        """Compress a bytes object in memory."""
        sink = io.BytesIO()
        self.compress_stream(io.BytesIO(data), sink)
        return sink.getvalue()


class CompressionWriter:
    """Takes the input piece by piece and writes the stream as whole windows fill.

    Each window is coded when ``batch x chunk_size`` bytes are in (cut before
    an unfinished UTF-8 character), written and flushed at once, so an
    interrupted run leaves complete blocks behind for ``--resume``.
    """

    def __init__(
        self,
        compressor: Compressor,
        sink: BinaryIO,
        progress: Callable[[Stats], None] | None = None,
        resume: StreamWriter | None = None,
    ) -> None:
        self._compressor = compressor
        self._progress = progress
        self._buffer = bytearray()
        self._started = time.perf_counter()
        self.stats = Stats(model_load_seconds=compressor.model.load_seconds)
        if resume is None:
            compressor.begin_stream()
            self._stream = StreamWriter(sink)
        else:
            self._stream = resume
            self.stats.output_bytes = resume.size
            self.stats.input_bytes = resume.total_size
        self._header_due = resume is None  # written with the first window: a learned prompt needs it
        self.closed = False

    def write(self, data: bytes) -> int:
        if self.closed:
            raise ValueError("write to a closed CompressionWriter")
        self._buffer += data
        if not (self._header_due and len(self._buffer) < self._compressor.steer_lookahead):
            self._code_full_windows()  # else still reading ahead: ``auto`` decides on the input's size
        return len(data)

    def close(self) -> Stats:
        """Code what is left, write the index and footer; returns the statistics."""
        if not self.closed:
            self._code_full_windows()  # what was read ahead is cut into windows as if written window by window
            if self._buffer:
                self._code(bytes(self._buffer))
                self._buffer.clear()
            self._write_header(b"")
            self.stats.output_bytes += self._stream.finish()
            self._flush_sink()
            self.closed = True
            self.stats.seconds = time.perf_counter() - self._started
        return self.stats

    def _code_full_windows(self) -> None:
        """Code every whole window the buffer holds, each cut where no UTF-8 character is split."""
        window = self._compressor.window_size
        while len(self._buffer) >= window:
            cut = utf8_safe_split(bytes(self._buffer[:window]))
            self._code(bytes(self._buffer[:cut]))
            del self._buffer[:cut]

    def _write_header(self, first_window: bytes) -> None:
        if self._header_due:
            self._compressor.steer_on(first_window, seen=len(self._buffer))  # the window is still buffered
            self.stats.output_bytes += self._stream.write_header(self._compressor.header())
            self._header_due = False

    def _code(self, window: bytes) -> None:
        self._write_header(window)
        for block in self._compressor.code_window(window, self.stats):
            self.stats.output_bytes += self._stream.write_block(block)
            self.stats.input_bytes += block.original_size
            self.stats.blocks[block.kind.name.lower()] += 1
        self._flush_sink()
        self.stats.seconds = time.perf_counter() - self._started
        if self._progress:
            self._progress(self.stats)

    def _flush_sink(self) -> None:
        flush = getattr(self._stream.sink, "flush", None)
        if flush:
            flush()
