"""The command line on bad days: listing, slicing, resuming, damage, removal, signals, pipes.

Everything runs the real launcher in a subprocess with the tiny model.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmpipe.cli.listing import describe
from tests.bad_archives import split_index
from tests.cli.test_cli import ROOT, run
from tests.tiny_model import DATA

TEXT = (DATA / "alice_chapter1.txt").read_bytes()[:6000]
LONG = (DATA / "alice_chapter1.txt").read_bytes() * 12  # long enough to be interrupted


@pytest.fixture(scope="module")
def settings(tiny_model, tiny_model_dir):
    return ["--model", str(tiny_model_dir), "--chunk-size", "256", "--batch", "2"]


@pytest.fixture(scope="module")
def packed(settings, tmp_path_factory):
    """``TEXT`` as a file and its archive (12 blocks of two 256-byte rows)."""
    folder = tmp_path_factory.mktemp("packed")
    (folder / "t.txt").write_bytes(TEXT)
    done = run([*settings, str(folder / "t.txt")])
    assert done.returncode == 0, done.stderr
    return folder / "t.txt.llmp"


def _blocks(archive: Path) -> list[tuple[int, int]]:
    """Each block's original ``(start, end)``, from the index."""
    with archive.open("rb") as source:
        entries = describe(source, str(archive), blocks=True)["streams"][0]["block_list"]
    return [(b["original_offset"], b["original_offset"] + b["original_bytes"]) for b in entries]


def test_list_reads_the_index_without_importing_torch(packed):
    code = (
        "import sys; from llmpipe.cli.main import main; status = main(['-l', '--json', sys.argv[1]]); "
        "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(status)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(packed)], capture_output=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    stream = info["streams"][0]
    assert info["original_bytes"] == len(TEXT) and info["compressed_bytes"] == packed.stat().st_size
    assert stream["blocks"] == 12 and sum(stream["rows"].values()) == 24 and stream["model"] == "tiny-llama"
    assert stream["numerics"] == {"engine": "exact", "version": 1} and stream["steering_bytes"] == 0
    table = run(["-l", "-v", str(packed)]).stdout.decode()
    assert "tiny-llama" in table and "block     12" in table


def test_list_of_a_truncated_archive_is_one_line_exit_1(packed, tmp_path):
    cut = tmp_path / "cut.llmp"
    cut.write_bytes(packed.read_bytes()[:-5])
    done = run(["-l", str(cut)])
    assert done.returncode == 1
    assert done.stderr.decode().count("\n") == 1 and "no index" in done.stderr.decode()


@pytest.mark.parametrize("span", ["0:1", "100:700", "255:257", "5999:6000", "3000:", ":10", "5990:99999", "7:7"])
def test_range_is_the_same_slice_of_the_original(packed, span):
    start, _, end = span.partition(":")
    expected = TEXT[int(start or 0) : int(end) if end else None]
    done = run(["-d", "-c", "--range", span, str(packed)])
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected


def test_range_of_a_float_archive_decodes_whole_groups(settings, tmp_path):
    source = tmp_path / "f.txt"
    source.write_bytes(TEXT[:3000])
    assert run([*settings, "--numerics", "float", str(source)]).returncode == 0
    done = run(["-d", "-c", "--range", "600:1400", str(tmp_path / "f.txt.llmp")])
    assert done.returncode == 0, done.stderr
    assert done.stdout == TEXT[600:1400]


def test_test_mode_writes_nothing(packed, tmp_path):
    assert run(["-t", str(packed)]).returncode == 0
    damaged = bytearray(packed.read_bytes())
    damaged[len(split_index(bytes(damaged))[0]) - 3] ^= 0x40  # the last block's payload
    bad = tmp_path / "bad.llmp"
    bad.write_bytes(bytes(damaged))
    done = run(["-t", str(bad)])
    start, end = _blocks(packed)[-1]
    assert done.returncode == 1 and f"block 12 (bytes {start}-{end - 1}): checksum mismatch" in done.stderr.decode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.llmp"]


def _wait_for(path: Path, size: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while (not path.exists() or path.stat().st_size < size) and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_compression_killed_midway_resumes(settings, tmp_path):
    source = tmp_path / "long.txt"
    source.write_bytes(LONG)
    part = tmp_path / "long.txt.llmp.part"
    launcher = [sys.executable, str(ROOT / "bin" / "llmpipe")]
    process = subprocess.Popen([*launcher, *settings, "--resume", str(source)], stderr=subprocess.PIPE)
    _wait_for(part, 3000, process)
    process.kill()
    process.wait()
    assert part.exists(), "finished before it could be killed"
    refused = run([*settings, str(source)])
    assert refused.returncode == 1 and b"--resume" in refused.stderr
    done = run([*settings, "--resume", str(source)])
    assert done.returncode == 0, done.stderr
    assert not part.exists()
    restored = run(["-d", "-c", str(tmp_path / "long.txt.llmp")])
    assert restored.stdout == LONG


@pytest.mark.parametrize("keep", [0.0, 0.37, 0.81, 1.0])
def test_compression_resumes_from_any_cut_of_a_partial_archive(settings, tmp_path, keep):
    source = tmp_path / "t.txt"
    source.write_bytes(TEXT)
    assert run([*settings, str(source)]).returncode == 0
    archive = (tmp_path / "t.txt.llmp").read_bytes()
    (tmp_path / "t.txt.llmp").rename(tmp_path / "t.txt.llmp.part")
    part = tmp_path / "t.txt.llmp.part"
    part.write_bytes(archive[: int(len(archive) * keep)] if keep < 1 else archive)
    done = run([*settings, "--resume", str(source)])
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "t.txt.llmp").read_bytes() == archive  # the same blocks as one uninterrupted run


def test_resume_refuses_a_changed_input(settings, packed, tmp_path):
    source = tmp_path / "t.txt"
    source.write_bytes(TEXT.replace(b"Alice", b"Alicia"))
    (tmp_path / "t.txt.llmp.part").write_bytes(packed.read_bytes()[:3000])
    done = run([*settings, "--resume", str(source)])
    assert done.returncode == 1 and b"input differs" in done.stderr


def test_decompression_resumes_checking_what_is_there(packed, tmp_path):
    archive = tmp_path / "t.txt.llmp"
    archive.write_bytes(packed.read_bytes())
    part = tmp_path / "t.txt.part"
    part.write_bytes(TEXT[:1000] + b"garbage written after the crash")
    done = run(["-d", "--resume", "-v", str(archive)])
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "t.txt").read_bytes() == TEXT and not part.exists()
    kept = max(end for _, end in _blocks(packed) if end <= 1000)
    assert f"{len(TEXT) - kept} <->".encode() in done.stderr  # only the blocks after the verified ones were decoded


def test_decompression_killed_midway_resumes(tmp_path, tiny_model_dir):
    source = tmp_path / "long.txt"
    source.write_bytes(LONG)
    assert run(["--model", str(tiny_model_dir), "--chunk-size", "256", "--batch", "8", str(source)]).returncode == 0
    source.unlink()
    launcher = [sys.executable, str(ROOT / "bin" / "llmpipe")]
    process = subprocess.Popen([*launcher, "-d", "--batch", "2", "--resume", str(tmp_path / "long.txt.llmp")])
    _wait_for(tmp_path / "long.txt.part", 9000, process)
    process.kill()
    process.wait()
    done = run(["-d", "--resume", str(tmp_path / "long.txt.llmp")])
    assert done.returncode == 0, done.stderr
    assert source.read_bytes() == LONG


def test_keep_going_writes_every_block_but_the_damaged_ones(packed, tmp_path):
    data = bytearray(packed.read_bytes())
    before_index = len(split_index(bytes(data))[0])
    data[before_index - 3] ^= 0x40  # the last block's payload
    data[400] ^= 0x01  # inside the header or payload of an early block
    archive = tmp_path / "t.txt.llmp"
    archive.write_bytes(bytes(data))
    stopped = run(["-d", "-c", str(archive)])
    assert stopped.returncode == 1 and TEXT.startswith(stopped.stdout)
    done = run(["-d", "--keep-going", str(archive)])
    assert done.returncode == 1
    message = done.stderr.decode()
    blocks = _blocks(packed)
    first = int(message.split("block ")[1].split()[0])
    (a, b), (c, _) = blocks[first - 1], blocks[-1]
    assert "2 damaged part(s) left out" in message and f"block 12 (bytes {c}-{len(TEXT) - 1})" in message
    assert (tmp_path / "t.txt").read_bytes() == TEXT[:a] + TEXT[b:c]


def test_keep_going_without_a_usable_index_reads_front_to_back(packed, tmp_path):
    data = bytearray(packed.read_bytes())
    before_index = len(split_index(bytes(data))[0])
    data[before_index + 3] ^= 0x01  # the index
    data[before_index - 3] ^= 0x40  # the last block's payload
    archive = tmp_path / "t.txt.llmp"
    archive.write_bytes(bytes(data))
    done = run(["-d", "--keep-going", str(archive)])
    message = done.stderr.decode()
    assert done.returncode == 1 and "2 damaged part(s) left out: block 12" in message and "index" in message
    assert (tmp_path / "t.txt").read_bytes() == TEXT[: _blocks(packed)[-1][0]]


def test_rm_removes_the_source_only_after_success(settings, tmp_path):
    source = tmp_path / "r.txt"
    source.write_bytes(TEXT[:900])
    done = run([*settings, "--rm", str(source)])
    assert done.returncode == 0, done.stderr
    assert not source.exists()
    assert run(["-d", "--rm", str(tmp_path / "r.txt.llmp")]).returncode == 0
    assert source.read_bytes() == TEXT[:900] and not (tmp_path / "r.txt.llmp").exists()
    bad = tmp_path / "bad.llmp"
    bad.write_bytes(b"not an archive")
    assert run(["-d", "--rm", str(bad)]).returncode == 1
    assert bad.exists()


def test_sigterm_removes_the_partial_output(settings, tmp_path):
    source = tmp_path / "long.txt"
    source.write_bytes(LONG)
    launcher = [sys.executable, str(ROOT / "bin" / "llmpipe")]
    process = subprocess.Popen([*launcher, *settings, str(source)], stderr=subprocess.PIPE)
    _wait_for(tmp_path / "long.txt.llmp.part", 1000, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0 and b"Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.txt"]


def test_several_files_and_one_missing(settings, tmp_path):
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_bytes(TEXT[:300] + name.encode())
    done = run([*settings, str(tmp_path / "a.txt"), str(tmp_path / "missing.txt"), str(tmp_path / "b.txt")])
    assert done.returncode == 1 and b"missing.txt: no such file" in done.stderr
    assert (tmp_path / "a.txt.llmp").exists() and (tmp_path / "b.txt.llmp").exists()  # the others still ran


def test_several_files_each_get_their_archive(settings, tmp_path):
    names = ("a.txt", "b.txt")
    for name in names:
        (tmp_path / name).write_bytes(TEXT[:300] + name.encode())
    assert run([*settings, *(str(tmp_path / n) for n in names)]).returncode == 0
    for name in names:
        (tmp_path / name).unlink()
    assert run(["-d", *(str(tmp_path / f"{n}.llmp") for n in names)]).returncode == 0
    assert [(tmp_path / n).read_bytes() for n in names] == [TEXT[:300] + n.encode() for n in names]


def test_progress_goes_to_stderr_when_forced(settings):
    done = run(["-c", *settings, "--progress"], TEXT[:2000])
    assert done.returncode == 0
    assert b"bits/byte" in done.stderr and b"KB/s" in done.stderr
    assert run(["-c", *settings], TEXT[:2000]).stderr == b""  # not a terminal: no progress


def test_broken_pipe_ends_quietly(tmp_path, settings):
    data = random.Random(5).randbytes(400_000)  # stored raw: fast, and more than a pipe buffer
    archive = run(["-c", *settings, "--chunk-size", "64K"], data).stdout
    (tmp_path / "r.llmp").write_bytes(archive)
    launcher = [sys.executable, str(ROOT / "bin" / "llmpipe")]
    process = subprocess.Popen(
        [*launcher, "-d", "-c", str(tmp_path / "r.llmp")], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert process.stdout.read(10) == data[:10]
    process.stdout.close()
    stderr = process.stderr.read()
    process.wait(timeout=120)
    assert stderr == b""
    assert process.returncode in (0, 1)


def test_options_that_do_not_go_together(packed):
    assert b"need an archive file" in run(["-d", "--range", "1:2"], packed.read_bytes()).stderr
    assert b"go with -d" in run(["--range", "1:2", str(packed)]).stderr
    assert run(["-d", "--range", "9:2", str(packed)]).returncode != 0
    assert b"--resume needs" in run(["-d", "--resume", "-c", str(packed)]).stderr


if os.name != "posix":  # signals and /dev/full
    pytestmark = pytest.mark.skip("POSIX only")
