"""The command line through a real subprocess: exit codes, stderr, stdout bytes, files."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bad_archives import split_header
from tests.tiny_model import DATA

ROOT = Path(__file__).resolve().parents[2]
TEXT = (DATA / "alice_chapter1.txt").read_bytes()[:1500]


def run(args, stdin=b"", env=None, cwd=None):
    return subprocess.run(
        [sys.executable, str(ROOT / "bin" / "llmpipe"), *args],
        input=stdin,
        capture_output=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=600,
    )


@pytest.fixture(scope="module")
def model_args(tiny_model, tiny_model_dir):
    return ["--model", str(tiny_model_dir), "--chunk-size", "512", "--batch", "2"]


@pytest.fixture(scope="module")
def archive(model_args):
    done = run(["-c", *model_args], TEXT)
    assert done.returncode == 0, done.stderr
    assert done.stderr == b""
    return done.stdout


def test_filter_round_trip(archive, model_args):
    assert archive[:6] == b"\xfaLLMP\x00"
    done = run(["-d", *model_args], archive)
    assert done.returncode == 0, done.stderr
    assert done.stdout == TEXT


def test_archive_from_batch_1_one_thread_decodes_with_batch_64_two_threads(tiny_model_dir):
    model = ["--model", str(tiny_model_dir), "--chunk-size", "256"]
    packed = run(["-c", *model, "--batch", "1", "-T", "1"], TEXT)
    assert packed.returncode == 0, packed.stderr
    restored = run(["-d", *model, "--batch", "64", "-T", "2"], packed.stdout)
    assert restored.returncode == 0, restored.stderr
    assert restored.stdout == TEXT


def test_exact_archives_are_the_same_bytes_at_every_thread_count(tiny_model_dir):
    """-T 1, 2 and 3 and -T 0 (every CPU) make the same exact archive: the thread count is not in it."""
    model = ["--model", str(tiny_model_dir), "--chunk-size", "1024"]
    archives = {threads: run(["-c", *model, "-T", threads], TEXT * 3) for threads in ("1", "2", "3", "0")}
    assert all(done.returncode == 0 for done in archives.values())
    assert len({done.stdout for done in archives.values()}) == 1


def test_default_threads_follow_the_cpus_this_process_may_use(monkeypatch):
    from llmpipe import defaults

    assert defaults.resolve_threads(3) == 3
    assert defaults.resolve_threads(defaults.ALL_THREADS) == len(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})  # as under taskset or a container
    assert defaults.resolve_threads(defaults.ALL_THREADS) == 5


def test_float_archive_records_its_numerics(tiny_model_dir):
    packed = run(["-c", "--model", str(tiny_model_dir), "--numerics", "float", "--chunk-size", "512"], TEXT)
    assert packed.returncode == 0, packed.stderr
    assert split_header(packed.stdout)[0]["numerics"]["engine"] == "float"
    restored = run(["-d", "--model", str(tiny_model_dir)], packed.stdout)
    assert restored.returncode == 0, restored.stderr
    assert restored.stdout == TEXT


def test_decoder_finds_the_model_by_hash_without_model_option(archive):
    done = run(["-d"], archive)
    assert done.returncode == 0, done.stderr
    assert done.stdout == TEXT


def test_not_an_archive_is_one_line_exit_1():
    done = run(["-d"], b"hello, not an archive")
    assert done.returncode == 1
    assert done.stdout == b""
    assert done.stderr.decode().strip() == "llmpipe: not an llmpipe archive (wrong magic)"


def test_damaged_archive_writes_nothing_unverified(archive):
    damaged = bytearray(archive)
    damaged[len(archive) // 2] ^= 0x01
    done = run(["-d"], bytes(damaged))
    assert done.returncode == 1
    assert b"Traceback" not in done.stderr
    assert len(done.stderr.decode().strip().splitlines()) == 1
    assert TEXT.startswith(done.stdout)  # only verified blocks before the damage


def test_truncated_archive(archive):
    done = run(["-d"], archive[:-20])
    assert done.returncode == 1
    assert "truncated" in done.stderr.decode() or "checksum" in done.stderr.decode()


def test_file_mode_keeps_source_and_refuses_overwrite(tmp_path, model_args):
    source = tmp_path / "a.txt"
    source.write_bytes(TEXT)
    assert run([*model_args, str(source)]).returncode == 0
    packed = tmp_path / "a.txt.llmp"
    assert packed.exists() and source.exists()
    source.rename(tmp_path / "orig.txt")
    done = run(["-d", str(packed)])
    assert done.returncode == 0, done.stderr
    assert source.read_bytes() == TEXT
    again = run(["-d", str(packed)])
    assert again.returncode == 1 and b"already exists" in again.stderr
    assert run(["-d", "-f", str(packed)]).returncode == 0
    assert not list(tmp_path.glob("*.part"))


def test_failed_decompression_leaves_no_output_file(tmp_path, archive):
    bad = tmp_path / "bad.llmp"
    bad.write_bytes(archive[:-30])
    done = run(["-d", str(bad)])
    assert done.returncode == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.llmp"]


def test_output_option_and_missing_input(tmp_path, archive):
    (tmp_path / "x.llmp").write_bytes(archive)
    assert run(["-d", str(tmp_path / "x.llmp"), "-o", str(tmp_path / "y")]).returncode == 0
    assert (tmp_path / "y").read_bytes() == TEXT
    done = run(["-d", str(tmp_path / "missing.llmp")])
    assert done.returncode == 1 and b"no such file" in done.stderr


def test_wrong_model_is_refused_before_any_output(archive, tmp_path):
    from tests.tiny_model import build_tiny_model

    other = build_tiny_model(tmp_path / "other", train_steps=1, seed=3)
    done = run(["-d", "--model", str(other)], archive)
    assert done.returncode == 1
    assert b"archive was made with model" in done.stderr
    assert done.stdout == b""


def test_missing_default_model_message(tmp_path):
    done = run(["-c"], b"x", env={"LLMPIPE_CACHE": str(tmp_path)})
    assert done.returncode == 1
    assert b"llmpipe fetch" in done.stderr


def test_version_and_bad_option():
    assert run(["-V"]).stdout.startswith(b"llmpipe ")
    done = run(["--no-such-option"])
    assert done.returncode != 0 and b"Traceback" not in done.stderr


@pytest.mark.parametrize("device", ["tpu", "cuda"])
def test_unusable_device_is_one_line(model_args, device):
    if device == "cuda" and __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA: tests/device/cross_decode.py checks it")
    done = run(["-c", *model_args, "--device", device], b"text")
    assert done.returncode == 1 and done.stdout == b""
    assert done.stderr.count(b"\n") == 1 and b"--device" in done.stderr


def test_float_weight_options_round_trip_and_exact_refuses_them(model_args, tmp_path):
    """--numerics float --dtype float16 --load-in-8bit through the CLI; the same options with exact numerics
    are refused in one line, exit 1, nothing on stdout."""
    data = b"A float16 run with 8-bit weights, through the command line. " * 30
    done = run(["-c", *model_args, "--numerics", "float", "--dtype", "float16", "--load-in-8bit"], data)
    assert done.returncode == 0, done.stderr
    assert run(["-d", *model_args], done.stdout).stdout == data
    refused = run(["-c", *model_args, "--dtype", "float16"], data)
    assert refused.returncode == 1 and refused.stdout == b""
    assert refused.stderr.count(b"\n") == 1 and b"--numerics float" in refused.stderr


def test_memory_plan_before_work(tiny_model_dir):
    """-v prints the plan before any weights are read; a batch over -M is refused in one line, naming the
    batch that fits; without --batch the compressor picks that batch itself."""
    model = ["--model", str(tiny_model_dir), "--chunk-size", "4K"]
    shown = run(["-c", "-v", *model], TEXT[:3000])
    assert shown.returncode == 0
    plan = [line for line in shown.stderr.decode().splitlines() if line.startswith("llmpipe: plan: ")]
    assert any("KV cache" in line for line in plan) and plan[-1].startswith("llmpipe: plan: fits: yes")
    refused = run(["-c", *model, "--batch", "64", "-M", "150M"], TEXT[:3000])
    assert refused.returncode == 1 and refused.stdout == b"" and refused.stderr.count(b"\n") == 1
    advice = re.search(rb"--batch 64: NO, .* over the 0.15 GiB limit on cpu \(--batch (\d+) fits\)", refused.stderr)
    assert advice and 1 <= int(advice.group(1)) < 64
    chosen = run(["-c", "-v", *model, "-M", "150M"], TEXT[:3000])
    assert chosen.returncode == 0 and run(["-d", "--model", str(tiny_model_dir)], chosen.stdout).stdout == TEXT[:3000]
    chosen_plan = [line for line in chosen.stderr.decode().splitlines() if line.startswith("llmpipe: plan: ")]
    assert chosen_plan[-1].startswith("llmpipe: plan: fits: yes")


def test_dev_full_fails(archive):
    if not Path("/dev/full").exists():
        pytest.skip("/dev/full not available")
    with open("/dev/full", "wb") as full:
        done = subprocess.run(
            [sys.executable, str(ROOT / "bin" / "llmpipe"), "-d"], input=archive, stdout=full, stderr=subprocess.PIPE
        )
    assert done.returncode == 1
    assert b"Traceback" not in done.stderr
