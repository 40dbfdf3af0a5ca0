"""Golden archives: made once, committed as base64 text, decoded again by every test run.

An archive made by an earlier llmpipe must still decode (the promise to
anyone keeping backups), and the encoder must still produce the same blocks
(so no change to numerics or format slips in unnoticed). Regenerate only on
purpose, together with a new format or numerics version:
``GENERATE_EXPECTED=1 pytest tests/test_golden.py tests/smoke/test_golden_archive.py``.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from llmpipe.pipeline.compress import Compressor
from llmpipe.pipeline.decompress import Decompressor
from tests.bad_archives import split_header, split_index

GOLDEN = Path(__file__).resolve().parent / "golden"


def check_golden(name: str, compressor: Compressor, decompressor: Decompressor, source: bytes, about: str) -> None:
    path = GOLDEN / f"{name}.json"
    archive = compressor.compress(source)
    if os.environ.get("GENERATE_EXPECTED"):
        record = {"about": about, "archive_base64": base64.b64encode(archive).decode()}
        path.write_text(json.dumps(record, indent=1) + "\n")
        pytest.skip(f"{path} regenerated")
    golden = base64.b64decode(json.loads(path.read_text())["archive_base64"])
    assert decompressor.decompress(golden) == source
    assert _blocks(archive) == _blocks(golden), "the encoder's blocks changed"


def decode_golden(name: str, decompressor: Decompressor, source: bytes) -> None:
    """An archive an earlier llmpipe wrote, in a format version it no longer writes: it must still decode."""
    golden = base64.b64decode(json.loads((GOLDEN / f"{name}.json").read_text())["archive_base64"])
    assert decompressor.decompress(golden) == source


def _blocks(archive: bytes) -> tuple[bytes, bytes]:
    """The blocks and the index entries: what the encoder decided, apart from the header and its size."""
    before_index, _, _, _, entries = split_index(archive)
    return split_header(before_index)[1], entries
