"""--workers N: local worker processes give the archive one process gives, in both directions, through faults.

The tiny model, windows of 512 bytes (two 256-byte rows), so that short
inputs make many segments. Numbers here are sizes and counts, never times.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import signal
import tracemalloc

import pytest

from llmpipe.errors import LlmpipeError, UsageError
from llmpipe.format.block import Block
from llmpipe.format.fields import crc32
from llmpipe.pipeline.compress import Compressor
from llmpipe.pipeline.jobs import Inline
from llmpipe.scale.launch import compressor_on_workers, decompressor_on_workers
from tests.cli.test_cli import run
from tests.tiny_model import DATA

TEXT = (DATA / "alice_chapter1.txt").read_bytes()
SETTINGS = {"chunk_size": 256, "batch": 2, "threads": 2}
INPUTS = {
    "empty": b"",
    "one window": TEXT[:400],
    "eleven windows": TEXT[:5300],
    "text and noise": TEXT[:1200] + random.Random(5).randbytes(900) + TEXT[2000:3100],
}


@pytest.fixture(scope="module")
def single(tiny_model):
    return Compressor(tiny_model, **SETTINGS)


@pytest.fixture(scope="module")
def on_workers(tiny_model_dir):
    compressor, pool = compressor_on_workers({"model": str(tiny_model_dir), **SETTINGS}, workers=2)
    yield compressor, pool
    pool.close()


@pytest.fixture(scope="module")
def prompted(tiny_model, tiny_model_dir):
    """One process and two workers steered by a text prompt (handed to the workers with each window)."""
    settings = {**SETTINGS, "steer": "text:Alice was"}
    compressor, pool = compressor_on_workers({"model": str(tiny_model_dir), **settings}, workers=2)
    yield Compressor(tiny_model, **settings), compressor
    pool.close()


@pytest.fixture(scope="module")
def decoding_workers(tiny_model_dir):
    decompressor, pool = decompressor_on_workers({"model": str(tiny_model_dir), "threads": 2, "batch": 4}, workers=2)
    yield decompressor, pool
    pool.close()


@pytest.mark.parametrize("name", INPUTS)
def test_workers_write_the_archive_one_process_writes(single, on_workers, decoding_workers, name):
    data = INPUTS[name]
    archive = single.compress(data)
    assert on_workers[0].compress(data) == archive
    assert decoding_workers[0].decompress(archive) == data


def test_a_prompt_decided_by_the_driver_steers_every_worker(prompted, decoding_workers):
    single, on_workers = prompted
    data = TEXT[:3000]
    archive = single.compress(data)
    assert on_workers.compress(data) == archive
    assert decoding_workers[0].decompress(archive) == data


def test_every_worker_took_its_share(on_workers):
    compressor, pool = on_workers
    assert len({hello["pid"] for hello in pool.hellos}) == 2
    assert {hello["pid"] for hello in pool.hellos}.isdisjoint({os.getpid()})


def test_a_worker_killed_mid_run_changes_nothing(single, on_workers, decoding_workers):
    data = TEXT[:12000]  # 24 windows
    archive = single.compress(data)
    for driver, pool in (on_workers, decoding_workers):
        lost_before = pool.lost
        killed: list[int] = []

        def kill_one(stats, pool=pool, killed=killed):
            if stats.blocks == 3 and not killed:
                killed.append(pool.hellos[-1]["pid"])
                os.kill(killed[0], signal.SIGKILL)

        sink = io.BytesIO()
        if isinstance(driver, Compressor):
            driver.compress_stream(io.BytesIO(data), sink, kill_one)
            assert sink.getvalue() == archive
        else:
            driver.decompress_stream(io.BytesIO(archive), sink, progress=kill_one)
            assert sink.getvalue() == data
        assert killed and pool.lost > lost_before


class _Generated(io.RawIOBase):
    """``size`` bytes of text made on demand: the input itself is never in memory."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left, len(TEXT))
        buffer[:n] = TEXT[:n]
        self.left -= n
        return n


class _Digest(io.RawIOBase):
    def __init__(self) -> None:
        self.hash = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.hash.update(data)
        return len(data)


def test_driver_memory_stays_bounded_on_a_long_input(prompted):
    """The driver's Python allocations while compressing 32 and 256 windows: the same bound, far under the
    input (measured with tracemalloc, not timed). A fixed prompt: ``--steer auto`` (the default) reads up to
    32 MiB ahead to learn the input's size before its first window."""
    _, compressor = prompted
    window = compressor.window_size
    peaks = []
    for windows in (32, 256):
        tracemalloc.start()
        compressor.compress_stream(io.BufferedReader(_Generated(windows * window)), _Digest())
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.5 * peaks[0], peaks  # 8x the input, about the same peak (here about 45 KB each)
    assert peaks[1] < 256 * window / 2, peaks  # under half the input: windows do not pile up


def test_a_block_that_does_not_match_its_window_is_asked_for_again_then_refused(single):
    """What a worker returns is checked before it is written: a block with another CRC32 is retried on a
    remote dispatch and refused when it comes back wrong again."""

    class Faulty(Inline):
        remote = True

        def __init__(self, runner, faults):
            super().__init__(runner)
            self.faults = faults

        def submit(self, job):
            future = super().submit(job)
            if self.faults:
                self.faults -= 1
                block, coding = future.result()
                future = type(future)()
                future.set_result((Block(block.rows, block.original_size, crc32(b"other")), coding))
            return future

    data = TEXT[:1500]
    archive = single.compress(data)
    try:
        single.dispatch = Faulty(single, faults=1)
        assert single.compress(data) == archive  # the second answer was right
        single.dispatch = Faulty(single, faults=2)
        with pytest.raises(LlmpipeError, match="coded the window at byte 0 wrongly twice"):
            single.compress(data)
    finally:
        single.dispatch = Inline(single)


def test_float_numerics_are_refused_on_workers(tiny_model_dir):
    with pytest.raises(UsageError, match="need exact numerics"):
        compressor_on_workers({"model": str(tiny_model_dir), **SETTINGS, "numerics": "float"}, workers=2)


def test_command_line_workers_range_and_resume(single, tiny_model_dir, tmp_path):
    data = TEXT[:6000]
    source = tmp_path / "t.txt"
    source.write_bytes(data)
    args = ["--model", str(tiny_model_dir), "--chunk-size", "256", "--batch", "2", "--workers", "2"]
    archive = single.compress(data)
    (tmp_path / "t.txt.llmp.part").write_bytes(archive[: len(archive) // 2])
    done = run([*args, "--resume", str(source)])
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "t.txt.llmp").read_bytes() == archive
    done = run(["-d", "-c", "--workers", "2", "--range", "1000:4500", str(tmp_path / "t.txt.llmp")])
    assert done.returncode == 0, done.stderr
    assert done.stdout == data[1000:4500]
    done = run(["-t", "--workers", "2", str(tmp_path / "t.txt.llmp")])
    assert done.returncode == 0, done.stderr
    assert run(["--workers", "0", str(source)]).stderr.strip() == b"llmpipe: --workers must be at least 1"


def test_decoding_with_workers_is_refused_for_another_model(decoding_workers, tiny_models):
    archive = Compressor(tiny_models["gpt2"], **SETTINGS).compress(TEXT[:600])
    decompressor, _ = decoding_workers
    with pytest.raises(LlmpipeError):
        decompressor.decompress(archive)
