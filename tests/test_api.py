"""The gzip-shaped Python interface: compress, decompress, open, with streaming in random pieces."""

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llmpipe
from tests.tiny_model import DATA

TEXT = (DATA / "alice_chapter1.txt").read_bytes()[:3000]


def test_compress_and_decompress(tiny_model):
    packed = llmpipe.compress(TEXT, model=tiny_model, chunk_size=256, batch=4)
    assert len(packed) < len(TEXT)
    assert llmpipe.decompress(packed, model=tiny_model) == TEXT


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.one_of(st.binary(max_size=1500), st.integers(0, 3000).map(lambda n: TEXT[:n])),
    seed=st.integers(0, 2**32),
    chunk_size=st.sampled_from([16, 100, 256]),
    batch=st.sampled_from([1, 3]),
)
def test_open_streams_in_pieces_of_any_size(tiny_model, tmp_path, data, seed, chunk_size, batch):
    rng = random.Random(seed)
    path = tmp_path / f"{seed}.llmp"
    with llmpipe.open(path, "wb", model=tiny_model, chunk_size=chunk_size, batch=batch) as f:
        position = 0
        while position < len(data):
            step = rng.randint(1, 700)
            assert f.write(data[position : position + step]) == len(data[position : position + step])
            position += step
    with path.open("rb") as archive:
        assert llmpipe.decompress(archive.read(), model=tiny_model) == data
    pieces = []
    with llmpipe.open(path, "rb", model=tiny_model) as f:
        while piece := f.read(rng.randint(1, 900)):
            pieces.append(piece)
    assert b"".join(pieces) == data


def test_open_rejects_other_modes(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        llmpipe.open(tmp_path / "x", "a")


def test_the_classes_that_keep_a_model_are_offered_at_the_top():
    from llmpipe.pipeline.compress import Compressor
    from llmpipe.pipeline.decompress import Decompressor

    assert llmpipe.Compressor is Compressor and llmpipe.Decompressor is Decompressor


def test_many_calls_with_the_same_options_load_the_model_once(tiny_model, monkeypatch):
    from llmpipe import api

    made = []

    def counted(kind: type) -> type:
        class Counted(kind):
            def __init__(self, *args, **kwargs):
                made.append(kind.__name__)
                super().__init__(*args, **kwargs)

        Counted.__name__ = kind.__name__  # what the reused coders are kept by
        return Counted

    for kind in (api.Compressor, api.Decompressor):
        monkeypatch.setattr(api, kind.__name__, counted(kind))
    monkeypatch.setattr(api, "_LAST", type(api._LAST)())  # no coder kept from an earlier test
    pieces = [TEXT[i * 300 : (i + 1) * 300] for i in range(4)]
    archives = [llmpipe.compress(p, model=tiny_model, chunk_size=256, batch=4) for p in pieces]
    assert [llmpipe.decompress(a, model=tiny_model) for a in archives] == pieces
    assert made == ["Compressor", "Decompressor"]
    llmpipe.compress(pieces[0], model=tiny_model, chunk_size=128, batch=4)  # other options: a new coder
    assert made == ["Compressor", "Decompressor", "Compressor"]


def test_the_command_loads_the_model_once_for_many_files(tiny_model, tmp_path, monkeypatch):
    from llmpipe.cli.main import main
    from llmpipe.models import cache

    loads = []
    real = cache.load
    monkeypatch.setattr(cache, "load", lambda spec: loads.append(spec) or real(spec))
    files = []
    for i in range(3):
        files.append(tmp_path / f"part{i}.txt")
        files[-1].write_bytes(TEXT[i * 500 : (i + 1) * 500])
    model = str(tiny_model.directory)
    assert main(["-q", "--model", model, "--chunk-size", "256", "--batch", "4", *map(str, files)]) == 0
    assert main(["-q", "-d", "-f", "--model", model, *(f"{f}.llmp" for f in files)]) == 0
    assert len(loads) == 2  # one model load for the three compressions, one for the three decompressions
    assert [f.read_bytes() for f in files] == [TEXT[i * 500 : (i + 1) * 500] for i in range(3)]
