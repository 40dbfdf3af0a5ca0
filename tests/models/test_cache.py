import json
from pathlib import Path

import pytest

from llmpipe.errors import ModelError
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
    assert tiny_model.identity()["tokenizer_sha256"] == tiny_model.tokenizer.sha256


def test_missing_default_model_says_how_to_fetch(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMPIPE_CACHE", str(tmp_path))
    with pytest.raises(ModelError, match="llmpipe fetch"):
        cache.load(None)


def test_unknown_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="not a model"):
        cache.resolve(str(tmp_path / "nope.bin"))
