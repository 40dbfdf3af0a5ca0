"""An archive made by an earlier llmpipe must still decode, and new archives must still be the same bytes.

``tests/golden/default_model.json`` holds an archive of the first 2000 bytes
of ``tests/data/enwik8_page.xml`` made with the default model and default
settings (base64, so the file stays text). Decoding it proves that exact
numerics v1 is reproduced on this machine; re-encoding proves the encoder has
not drifted. Regenerate only together with a new numerics or format version:
``GENERATE_EXPECTED=1 pytest tests/smoke/test_golden_archive.py``.
"""

import base64
import json
import os
from pathlib import Path

import pytest

from llmpipe.compressor import Compressor
from llmpipe.decompressor import Decompressor
from tests.bad_archives import split_header
from tests.tiny_model import DATA

pytestmark = pytest.mark.smoke
GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "default_model.json"
SOURCE = (DATA / "enwik8_page.xml").read_bytes()[:2000]


def test_golden_archive(default_model):
    archive = Compressor(default_model).compress(SOURCE)
    if os.environ.get("GENERATE_EXPECTED"):
        record = {
            "source": "tests/data/enwik8_page.xml, first 2000 bytes",
            "settings": "defaults (exact numerics, chunk 2048, batch 64)",
            "archive_base64": base64.b64encode(archive).decode(),
        }
        GOLDEN.write_text(json.dumps(record, indent=1) + "\n")
        pytest.skip("golden archive regenerated")
    golden = base64.b64decode(json.loads(GOLDEN.read_text())["archive_base64"])
    assert Decompressor(default_model).decompress(golden) == SOURCE
    assert split_header(archive)[1] == split_header(golden)[1], "the encoder's blocks changed"
