"""The golden archive of the committed tiny model (see ``tests/golden_archives.py``)."""

import io

from llmpipe.pipeline.compress import Compressor
from llmpipe.pipeline.decompress import Decompressor
from tests.golden_archives import check_golden, decode_golden, golden_bytes
from tests.tiny_model import DATA

SOURCE = (DATA / "alice_chapter1.txt").read_bytes()[:3000] + b"\xff\x00<|im_start|>\r\n" + bytes(range(256))


ABOUT = (
    "tests/data/alice_chapter1.txt, first 3000 bytes, plus invalid UTF-8, NUL, special-token text and all 256 "
    "byte values; tests/data/tiny-llama, chunk size 256, batch 4, exact numerics v1"
)


def test_golden_archive(tiny_model):
    """Format version 3; the version 2 archive of the same settings still decodes, and has the same rows."""
    compressor = Compressor(tiny_model, chunk_size=256, batch=4, threads=1)
    about = ABOUT + ", mixer ngram-match v2, format version 3"
    check_golden("tiny_model_v3", compressor, Decompressor(tiny_model), SOURCE, about, "tiny_model_mixer_v2")


def test_golden_archive_of_mixer_v1_still_decodes(tiny_model):
    """Written before the adaptive bias (mixer version 1, session 8): no longer written, still decoded."""
    decode_golden("tiny_model", Decompressor(tiny_model), SOURCE)


def test_golden_archive_without_mixer(tiny_model):
    """Archives from before the mixer (no ``mixer`` header field) still decode, and --mixer none makes them."""
    compressor = Compressor(tiny_model, chunk_size=256, batch=4, threads=1, mixing=False)
    about = ABOUT + ", format version 3"
    check_golden("tiny_model_v3_no_mixer", compressor, Decompressor(tiny_model), SOURCE, about, "tiny_model_no_mixer")


def test_golden_archive_with_steering(tiny_model):
    """A random steering prompt (vectors from SHA-256, FORMAT.md section 5) changes no bit over time."""
    compressor = Compressor(tiny_model, chunk_size=256, batch=4, threads=1, steer="random:4:9")
    about = ABOUT + ", mixer ngram-match v2, --steer random:4:9, format version 3"
    name, earlier = "tiny_model_v3_steer_random", "tiny_model_steer_random"
    check_golden(name, compressor, Decompressor(tiny_model), SOURCE, about, earlier)


def test_archives_of_both_format_versions_concatenate(tiny_model):
    """A version 2 archive, a version 3 one and another version 2 one, back to back: their contents, in
    order, front to back and through the indexes (as ``cat old.llmp new.llmp`` makes them)."""
    old = golden_bytes("tiny_model_mixer_v2")
    new = Compressor(tiny_model, chunk_size=256, batch=4, threads=1).compress(b"between the old ones\n" * 50)
    decompressor = Decompressor(tiny_model)
    expected = SOURCE + b"between the old ones\n" * 50 + SOURCE
    assert decompressor.decompress(old + new + old) == expected
    sink = io.BytesIO()
    decompressor.decompress_range(io.BytesIO(old + new + old), sink, "both", len(SOURCE) - 10, len(SOURCE) + 30)
    assert sink.getvalue() == expected[len(SOURCE) - 10 : len(SOURCE) + 30]
