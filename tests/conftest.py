"""Shared fixtures: an isolated model cache and the tiny trained model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmpipe.models import cache
from tests.tiny_model import COMMITTED

REAL_CACHE = cache.cache_dir()  # read before the isolated cache below replaces it
SHARED_CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "corpus"


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The Hugging Face checkpoint directory of the committed tiny model (see ``tests/tiny_model.py``)."""
    return COMMITTED


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tests prepare models into their own cache, never the user's (the smoke tier opts back in)."""
    path = tmp_path_factory.mktemp("llmpipe-cache")
    os.environ["LLMPIPE_CACHE"] = str(path)
    os.environ["HF_HUB_OFFLINE"] = "1"
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path, isolated_cache: Path):
    """The tiny model, prepared into the test cache and loaded."""
    from llmpipe.models import cache

    return cache.load(str(tiny_model_dir))


ARCHITECTURES = ("llama", "gpt_neox", "gpt2")


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``arch -> checkpoint directory``: the committed tiny Llama, and GPT-NeoX and GPT-2 models
    built now (a few seconds each, see ``tests/tiny_model.py``)."""
    from tests.tiny_model import build_tiny_model

    dirs = {"llama": COMMITTED}
    for arch in ARCHITECTURES[1:]:
        dirs[arch] = build_tiny_model(tmp_path_factory.mktemp(arch) / arch, arch=arch)
    return dirs


@pytest.fixture(scope="session")
def tiny_models(tiny_model, tiny_model_dirs: dict[str, Path]) -> dict:
    """``arch -> LoadedModel``, each prepared through the same path as ``--model DIR``."""
    from llmpipe.models import cache

    return {"llama": tiny_model} | {arch: cache.load(str(tiny_model_dirs[arch])) for arch in ARCHITECTURES[1:]}


def corpus_file(relative: str) -> Path:
    """A file of ../shared/corpus, or skip the test (saying so) when the corpus is absent."""
    path = SHARED_CORPUS / relative
    if not path.exists():
        pytest.skip(f"../shared/corpus/{relative} not available (clone without the shared corpus)")
    return path


@pytest.fixture(scope="session")
def default_model():
    """The real default model from the user's cache (`make test` fetches it first)."""
    path = REAL_CACHE / "models" / cache.DEFAULT_MODEL
    if not (path / "llmpipe.json").exists():
        pytest.fail(f"the default model is not in {REAL_CACHE}; run `make model` (or `llmpipe fetch`) first")
    return cache.load(str(path))
