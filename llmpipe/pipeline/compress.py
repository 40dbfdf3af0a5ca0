"""Streaming compression: chunk the input, code windows of rows, write blocks.

Memory is bounded by one window (``batch`` rows) whatever the input length.
:class:`Compressor` holds the loaded model, the engine and the settings, and
writes any number of streams; :class:`CompressionWriter` takes one stream's
input piece by piece. How a window becomes blocks is ``blocks``; how a
prompt is chosen, ``steer``; how an interrupted run continues, ``resume``.
"""

from __future__ import annotations

import functools
import io
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import BinaryIO

from llmpipe.codec import mixer
from llmpipe.codec.coder import LlmCoder
from llmpipe.codec.context import ContextWindow
from llmpipe.codec.frequencies import FREQ_BITS
from llmpipe.codec.memory import check_history_budget
from llmpipe.defaults import (
    ALL_THREADS,
    DEFAULT_BATCH,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_CONTEXT,
    DEFAULT_OVERLAP,
    DEFAULT_STEER,
    DEFAULT_STEER_EPOCHS,
    DEFAULT_STEER_SECONDS,
    VERSION,
    resolve_threads,
)
from llmpipe.engine import create_engine, usable_device
from llmpipe.engine.memory import available_memory, check_kv_budget
from llmpipe.errors import ArchiveError, LlmpipeError, TruncatedArchiveError, UsageError
from llmpipe.format.block import Block
from llmpipe.format.container import ContainerReader, StreamWriter
from llmpipe.format.fields import MAX_CHUNK_SIZE, MAX_ROWS, MAX_WINDOW, crc32
from llmpipe.format.header import VERSION as FORMAT_VERSION
from llmpipe.format.header import stream_header_bytes
from llmpipe.models import cache
from llmpipe.models.cache import LoadedModel
from llmpipe.pipeline.blocks import MIN_BYTES_PER_SYMBOL, WindowCoder, utf8_safe_split
from llmpipe.pipeline.jobs import CodeWindow, Dispatch, Inline
from llmpipe.pipeline.plan import coding_plan, default_batch
from llmpipe.pipeline.resume import keep_complete_blocks
from llmpipe.pipeline.stats import Stats
from llmpipe.pipeline.steer import Steering, SteeringChoice
from llmpipe.steering.prompt import SteeringPrompt, learned_prompt, prompt_from_record
from llmpipe.tokenization import ESCAPE_SYMBOLS


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
        self._steering = Steering(steer, self.model, steer_epochs, steer_seconds, log)
        self.prompt = self._steering.fixed
        plan_of = functools.partial(
            coding_plan,
            self.model.config,
            chunk_size=chunk_size,
            context=self.context,
            prompt=self._steering.prompt_positions,
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
        self._engine = engine
        self.windows = WindowCoder(
            LlmCoder(engine, self.model.tokenizer), self.context, batch, chunk_size, mixer.VERSION if mixing else 0
        )
        """How windows become blocks; ``windows.mixer_version`` is what the archive's tables are mixed with."""
        self.dispatch: Dispatch = Inline(self)
        """Where windows are coded: here, or by a pool of workers (``llmpipe.scale``) that the caller sets."""

    def begin_stream(self) -> None:
        """A new stream: with ``learn:N`` its prompt is learned again, from its own first window."""
        if self._steering.learn:
            self.set_prompt(None)

    @property
    def steer_lookahead(self) -> int:
        """How many bytes of a stream's input the writer reads before its header (``steer.Steering``)."""
        return self._steering.lookahead

    def steer_on(self, sample: bytes, seen: int | None = None) -> SteeringChoice | None:
        """Before the header is written: learn the stream's prompt on ``sample`` and keep the best coding of
        it, or none (``steer.Steering.decide``); ``seen``: how many bytes of the input were read ahead (at
        least ``sample``). Returns what was learned and measured, if anything."""
        choice = self._steering.decide(sample, seen, self.header_bits)
        if choice is not None:
            self.set_prompt(learned_prompt(choice.chosen.coded) if choice.chosen.coded else None)
        return choice

    def header_bits(self, prompt: SteeringPrompt | None) -> int:
        """What ``prompt`` adds to the stream header, in bits: the price it pays in every archive."""
        header = self.header()
        with_prompt = {**header, "steering": prompt.record() if prompt else None}
        return 8 * (len(stream_header_bytes(with_prompt)) - len(stream_header_bytes({**header, "steering": None})))

    def set_prompt(self, prompt: SteeringPrompt | None) -> None:
        """Code the following windows with ``prompt`` (with ``learn:N``/``auto``: until the next stream)."""
        self.prompt = prompt
        self._engine.set_prompt(prompt)

    def header(self) -> dict:
        return {
            "llmpipe": VERSION,
            "model": self.model.identity(),
            "chunk_size": self.chunk_size,
            "prime_token": self.model.tokenizer.prime_token,
            "coder": {"name": "range64", "freq_bits": FREQ_BITS, "escape_symbols": ESCAPE_SYMBOLS},
            "batch": self.batch,
            "context": self.context.record(),
            "mixer": mixer.record(self.windows.mixer_version),
            "numerics": self._engine.numerics(),
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

        The partial archive must have been made with these settings from the
        same seekable input (``resume.keep_complete_blocks`` checks every kept
        block against it). Returns the writer to continue with, or None when
        not even the stream header was complete (start afresh).
        """
        reader = ContainerReader(partial, name)
        try:
            header = reader.read_stream_header(first=True)
        except TruncatedArchiveError:  # killed before the header was out
            header = None
        except ArchiveError as exc:
            raise UsageError(f"{name}: cannot resume from it ({exc})") from None
        if header is None or header["model"] is None:  # nothing yet, or a one-block stream without a model
            partial.seek(0)
            partial.truncate()
            return None
        if reader.version != FORMAT_VERSION:
            raise UsageError(f"{name}: written in format version {reader.version}; cannot resume it")
        if self._steering.learn:  # the partial archive's prompt was learned on this input: keep it
            config = self.model.config
            self.set_prompt(prompt_from_record(header.get("steering"), config.hidden_size, config.vocab_size))
        mine = self.header()
        differ = sorted(k for k in set(mine) | set(header) if k != "llmpipe" and mine.get(k) != header.get(k))
        if differ:
            raise UsageError(f"{name}: made with other settings ({', '.join(differ)}); cannot resume it")
        return keep_complete_blocks(partial, name, reader, source, self.batch, self.window_size)

    @property
    def window_size(self) -> int:
        """Bytes coded together: ``batch`` chunks."""
        return self.chunk_size * self.batch

    def code_window(self, window: bytes, stats: Stats) -> Block:
        """Code one window as up to ``batch`` rows: its block (``blocks.WindowCoder``)."""
        return self.windows.code_window(window, stats)

    def run(self, job: CodeWindow) -> tuple[Block, Stats]:
        """Code a window handed out by a driver (``jobs``): its block, and what its LLM rows coded."""
        config = self.model.config
        if job.steering != (self.prompt.record() if self.prompt else None):
            self.set_prompt(prompt_from_record(job.steering, config.hidden_size, config.vocab_size))
        coding = Stats()
        return self.code_window(job.window, coding), coding

    def compress(self, data: bytes) -> bytes:
        """Compress a bytes object in memory."""
        sink = io.BytesIO()
        self.compress_stream(io.BytesIO(data), sink)
        return sink.getvalue()


class CompressionWriter:
    """Takes the input piece by piece and writes the stream as whole windows fill.

    Each window is cut when ``batch x chunk_size`` bytes are in (before an
    unfinished UTF-8 character) and submitted to the compressor's dispatch;
    blocks are written in input order, each flushed at once, so an
    interrupted run leaves complete blocks behind for ``--resume``. Whatever
    runs the windows, a block is written only if its size and CRC32 are
    those of the window sent (else it is asked for once more, then refused).
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
            self.stats.archive_bytes = resume.size
            self.stats.original_bytes = resume.total_size
        self._header_due = resume is None  # written with the first window: a learned prompt needs it
        self._steered = resume is not None  # the steering decision, made on the first window
        self._in_flight: deque[tuple[CodeWindow, Future, bool]] = deque()  # (job, its block, last window)
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
                self._code(bytes(self._buffer), last=True)
                self._buffer.clear()
            self._write_blocks(keep=0)
            if self._header_due:  # empty input: nothing needs a model
                self.stats.archive_bytes += self._stream.write_header({"model": None})
                self._header_due = False
            self.stats.archive_bytes += self._stream.finish()
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

    def _code(self, window: bytes, last: bool = False) -> None:
        """Submit one window (after the steering decision, on the first) and write the blocks that are due."""
        if not self._steered:
            self._compressor.steer_on(window, seen=len(self._buffer))  # the window is still buffered
            self._steered = True
        prompt = self._compressor.prompt
        job = CodeWindow(window, prompt.record() if prompt else None)
        self._in_flight.append((job, self._compressor.dispatch.submit(job), last))
        self._write_blocks(keep=self._compressor.dispatch.ahead)

    def _write_blocks(self, keep: int) -> None:
        """Write finished blocks in input order until at most ``keep`` windows are in flight.

        The stream header goes out with the first block: a stream that is one
        window with no LLM row needs no model, and its header says so (13
        bytes, FORMAT.md section 2).
        """
        while len(self._in_flight) > keep:
            job, future, last = self._in_flight.popleft()
            block, coding = future.result()
            if not _matches(block, job.window) and self._compressor.dispatch.remote:
                block, coding = self._compressor.dispatch.submit(job).result()
            if not _matches(block, job.window):
                raise LlmpipeError(f"a worker coded the window at byte {self.stats.original_bytes} wrongly twice")
            self.stats.add_coding(coding)
            if self._header_due:
                header = {"model": None} if last and not block.llm_rows else self._compressor.header()
                self.stats.archive_bytes += self._stream.write_header(header)
                self._header_due = False
            self.stats.archive_bytes += self._stream.write_block(block)
            self.stats.original_bytes += block.original_size
            self.stats.count(block.rows)
            self._flush_sink()
            self.stats.seconds = time.perf_counter() - self._started
            if self._progress:
                self._progress(self.stats)

    def _flush_sink(self) -> None:
        flush = getattr(self._stream.sink, "flush", None)
        if flush:
            flush()


def _matches(block: Block, window: bytes) -> bool:
    """Whether a block returned for ``window`` claims its size and CRC32 (what a driver can check without
    decoding; the decoder checks the rows' contents against the CRC)."""
    return block.original_size == len(window) and block.checksum == crc32(window)
