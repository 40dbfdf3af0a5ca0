"""Golden archives: made once, committed as base64 text, decoded again by every test run.

An archive made by an earlier llmpipe must still decode (the promise to
anyone keeping backups), and the encoder must still produce the same blocks
(so no change to numerics or format slips in unnoticed). Regenerate only on
purpose, together with a new format or numerics version:
``GENERATE_EXPECTED=1 pytest tests/test_golden.py tests/smoke/test_golden_archive.py``.
"""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

import pytest

from llmpipe.format.block import RowKind
from llmpipe.format.container import ContainerReader
from llmpipe.format.fields import MAX_ROWS, MAX_WINDOW
from llmpipe.pipeline.compress import Compressor
from llmpipe.pipeline.decompress import Decompressor
from tests.bad_archives import split_header, split_index

GOLDEN = Path(__file__).resolve().parent / "golden"


def check_golden(
    name: str, compressor: Compressor, decompressor: Decompressor, source: bytes, about: str, earlier: str = ""
) -> None:
    """``earlier``: a golden archive of the same input and settings in format version 2, whose coded rows
    must be this one's (a format change moves no coded bit)."""
    path = GOLDEN / f"{name}.json"
    archive = compressor.compress(source)
    if os.environ.get("GENERATE_EXPECTED"):
        record = {"about": about, "archive_base64": base64.b64encode(archive).decode()}
        path.write_text(json.dumps(record, indent=1) + "\n")
        pytest.skip(f"{path} regenerated")
    golden = golden_bytes(name)
    assert decompressor.decompress(golden) == source
    assert _blocks(archive) == _blocks(golden), "the encoder's blocks changed"
    if earlier:
        decode_golden(earlier, decompressor, source)
        assert coded_rows(golden) == coded_rows(golden_bytes(earlier)), "the coded rows changed with the format"


def decode_golden(name: str, decompressor: Decompressor, source: bytes) -> None:
    """An archive an earlier llmpipe wrote, in a format version it no longer writes: it must still decode."""
    assert decompressor.decompress(golden_bytes(name)) == source


def golden_bytes(name: str) -> bytes:
    return base64.b64decode(json.loads((GOLDEN / f"{name}.json").read_text())["archive_base64"])


def coded_rows(archive: bytes) -> list[tuple[RowKind, bytes]]:
    """Every row's kind and coded bytes in stream order, whatever the format version (a zstd frame without
    its magic number, as version 3 stores it)."""
    reader = ContainerReader(io.BytesIO(archive), "golden")
    reader.read_stream_header(first=True)
    rows = []
    while (block := reader.read_block(MAX_WINDOW, MAX_ROWS)) is not None:
        for row in block.rows:
            magic = 4 if reader.version == 2 and row.kind == RowKind.ZSTD else 0
            rows.append((row.kind, row.payload[magic:]))
    return rows


def _blocks(archive: bytes) -> tuple[bytes, bytes]:
    """The blocks and the index entries: what the encoder decided, apart from the header and its size."""
    before_index, _, entries = split_index(archive)
    return split_header(before_index)[1], b"".join(entries)
