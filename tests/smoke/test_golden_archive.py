"""The golden archive of the default model (see ``tests/golden_archives.py``)."""

import pytest

from llmpipe.pipeline.compress import Compressor
from llmpipe.pipeline.decompress import Decompressor
from tests.golden_archives import check_golden, decode_golden
from tests.tiny_model import DATA

pytestmark = pytest.mark.smoke


SOURCE = (DATA / "enwik8_page.xml").read_bytes()[:2000]


def test_golden_archive(default_model):
    about = (
        "tests/data/enwik8_page.xml, first 2000 bytes; default model and settings "
        "(exact numerics v1, mixer ngram-match v2), format version 3"
    )
    compressor, decompressor = Compressor(default_model), Decompressor(default_model)
    check_golden("default_model_v3", compressor, decompressor, SOURCE, about, "default_model_mixer_v2")


def test_golden_archive_of_mixer_v1_still_decodes(default_model):
    """Written with mixer version 1 (before the adaptive bias): no longer written, still decoded."""
    decode_golden("default_model", Decompressor(default_model), SOURCE)
