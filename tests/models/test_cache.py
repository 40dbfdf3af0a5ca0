import json
from pathlib import Path

import pytest

from llmpipe.errors import ModelError
from llmpipe.format.header import model_id
from llmpipe.models import cache


def test_cache_location_honours_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("LLMPIPE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "llmpipe"
    monkeypatch.setenv("LLMPIPE_CACHE", str(tmp_path / "own"))
    assert cache.cache_dir() == tmp_path / "own"


def test_prepared_model_records_identity(tiny_model, isolated_cache):
    metas = [json.loads(p.read_text()) for p in Path(isolated_cache, "models").glob("*/llmpipe.json")]
    assert any(m["weights_sha256"] == tiny_model.weights_sha256 for m in metas)
    assert cache.weights_hash(tiny_model.weights) == tiny_model.weights_sha256
    assert tiny_model.identity()["id"] == model_id(tiny_model.weights_sha256, tiny_model.tokenizer.sha256)


def test_missing_default_model_says_how_to_fetch(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMPIPE_CACHE", str(tmp_path))
    with pytest.raises(ModelError, match="llmpipe fetch"):
        cache.load(None)


def test_unknown_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="not a model"):
        cache.resolve(str(tmp_path / "nope.bin"))


def test_cache_keeps_the_checkpoint_dtype_and_hashes_values(tiny_model):
    """The committed tiny checkpoint is float16: the cache stores float16 (half of float32's disk and memory),
    and the identity hash is that of the same values widened to float32, so it names values, not storage."""
    import torch

    assert tiny_model.weights["model.embed_tokens.weight"].dtype == torch.float16
    widened = {name: tensor.to(torch.float32) for name, tensor in tiny_model.weights.items()}
    assert cache.weights_hash(widened) == tiny_model.weights_sha256
    changed = dict(widened)
    changed["model.norm.weight"] = changed["model.norm.weight"] * 2
    assert cache.weights_hash(changed) != tiny_model.weights_sha256


def test_weights_are_read_lazily_from_the_cache(tiny_model):
    """Loading maps the file; tensors are read when asked for (a 7B model is never all in memory twice)."""
    weights = tiny_model.weights
    assert isinstance(weights, cache.LazyWeights)
    assert "model.norm.weight" in weights and "no.such.weight" not in weights
    assert len(weights) == len(list(weights)) and sorted(weights) == list(weights)
    with pytest.raises(KeyError):
        weights["no.such.weight"]
