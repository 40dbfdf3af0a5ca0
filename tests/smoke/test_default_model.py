"""Smoke tier: the real default model (SmolLM2-135M) on a few KB of text."""

import lzma
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from llmpipe.pipeline.compress import Compressor
from llmpipe.pipeline.decompress import Decompressor
from tests.conftest import REAL_CACHE, corpus_file
from tests.tiny_model import DATA

pytestmark = pytest.mark.smoke
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def codec(default_model):
    return Compressor(default_model, chunk_size=1024, batch=4), Decompressor(default_model)


@pytest.mark.parametrize("name", ["alice_chapter1.txt", "enwik8_page.xml"])
def test_shipped_texts_round_trip_well_below_xz(codec, name):
    compressor, decompressor = codec
    data = (DATA / name).read_bytes()[:3000] + b"\n\xff\xfe<|im_start|>\x00\r\n"
    archive = compressor.compress(data)
    assert decompressor.decompress(archive) == data
    header_size = 16 + struct.unpack("<I", archive[8:12])[0]
    xz_size = len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    assert len(archive) - header_size < 0.75 * xz_size


def test_corpus_slice(codec):
    compressor, decompressor = codec
    data = corpus_file("calgary/paper2").read_bytes()[:2048]
    assert decompressor.decompress(compressor.compress(data)) == data


def test_cli_pipeline_with_default_model():
    env = {**os.environ, "LLMPIPE_CACHE": str(REAL_CACHE)}
    text = (DATA / "enwik8_page.xml").read_bytes()[:1200]
    launcher = [sys.executable, str(ROOT / "bin" / "llmpipe")]
    packed = subprocess.run([*launcher, "-c"], input=text, capture_output=True, env=env, timeout=900)
    assert packed.returncode == 0, packed.stderr
    restored = subprocess.run([*launcher, "-d"], input=packed.stdout, capture_output=True, env=env, timeout=900)
    assert restored.returncode == 0, restored.stderr
    assert restored.stdout == text


def test_readme_python_example_runs(monkeypatch):
    """The README's Python example is executed as written."""
    monkeypatch.setenv("LLMPIPE_CACHE", str(REAL_CACHE))
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
