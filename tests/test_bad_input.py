"""The bad-input suite (tests/bad_archives.py) on a small archive made with the tiny model."""

from llmpipe.models import cache
from llmpipe.pipeline.compress import Compressor
from llmpipe.pipeline.decompress import Decompressor
from tests import bad_archives
from tests.tiny_model import DATA, build_tiny_model


def test_every_bad_archive_is_refused_cleanly(tiny_model, tmp_path):
    original = (DATA / "alice_chapter1.txt").read_bytes()[:150]
    archive = Compressor(tiny_model, chunk_size=64, batch=2, threads=1).compress(original)
    assert Decompressor(tiny_model).decompress(archive) == original
    other = cache.load(str(build_tiny_model(tmp_path / "other", train_steps=1, seed=2)))
    other_archive = Compressor(other, chunk_size=64, batch=2, threads=1).compress(original)
    assert bad_archives.split_header(archive)[0]["model"] is not None  # it holds LLM rows
    count, failures = bad_archives.run_all(Decompressor(tiny_model), original, archive, other_archive)
    print(f"bad-input suite: {count} cases, {count - len(failures)} passed")
    assert count > 9 * len(archive)  # every truncation and every single-bit flip
    assert failures == []


def test_every_bad_archive_without_a_model_is_refused_cleanly(tiny_model):
    """A short input the model does not win: a stream that names no model (FORMAT.md section 2)."""
    original = bytes(range(0, 256, 3))
    archive = Compressor(tiny_model, chunk_size=64, batch=2, threads=1).compress(original)
    assert bad_archives.split_header(archive)[0] == {"model": None}
    count, failures = bad_archives.run_all(Decompressor(tiny_model), original, archive, archive)
    assert count > 9 * len(archive)
    assert failures == []
