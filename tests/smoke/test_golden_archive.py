"""The golden archive of the default model (see ``tests/golden_archives.py``)."""

import pytest

from llmpipe.compressor import Compressor
from llmpipe.decompressor import Decompressor
from tests.golden_archives import check_golden
from tests.tiny_model import DATA

pytestmark = pytest.mark.smoke


def test_golden_archive(default_model):
    source = (DATA / "enwik8_page.xml").read_bytes()[:2000]
    about = (
        "tests/data/enwik8_page.xml, first 2000 bytes; default model and settings "
        "(exact numerics v1, mixer ngram-match v1)"
    )
    check_golden("default_model", Compressor(default_model), Decompressor(default_model), source, about)
