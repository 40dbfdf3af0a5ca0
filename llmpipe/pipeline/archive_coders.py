"""The coder an archive's header asks for: its model loaded once, its identity and numerics checked.

A decoder must refuse, before any model work, an archive it would decode
wrongly: one made with other weights or tokenizer, with a numerics version it
does not implement, or with float numerics recorded on a different machine
(unless forced).
"""

from __future__ import annotations

import json
from pathlib import Path

from llmpipe.codec.coder import LlmCoder
from llmpipe.defaults import FLOAT_DTYPES
from llmpipe.engine import create_engine, usable_device
from llmpipe.engine.exact_transformer import NUMERICS_VERSION
from llmpipe.engine.float_engine import numeric_fingerprint
from llmpipe.errors import ArchiveError, ModelError, ModelMismatchError
from llmpipe.format.fields import MAX_ROWS
from llmpipe.format.header import model_id
from llmpipe.models import cache
from llmpipe.models.cache import LoadedModel
from llmpipe.pipeline.stream_settings import header_field
from llmpipe.steering.prompt import prompt_from_record


def find_cached_model(wanted: dict) -> Path | None:
    """A prepared model in the cache with the identity a header's ``model`` names, whatever it is called."""
    models = cache.cache_dir() / "models"
    for meta_file in sorted(models.glob("*/llmpipe.json")) if models.is_dir() else []:
        try:
            meta = json.loads(meta_file.read_text())
            if _identity(meta["weights_sha256"], meta["tokenizer_sha256"], wanted) == _wanted(wanted):
                return meta_file.parent
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def _identity(weights_sha256: str, tokenizer_sha256: str, wanted: dict) -> dict:
    """A model's identity in the terms of the header ``wanted`` comes from: version 3's ``id``, version 2's
    two hashes."""
    if "id" in wanted:
        return {"id": model_id(weights_sha256, tokenizer_sha256)}
    return {"weights_sha256": weights_sha256, "tokenizer_sha256": tokenizer_sha256}


def _wanted(wanted: dict) -> dict:
    keys = ("id",) if "id" in wanted else ("weights_sha256", "tokenizer_sha256")
    return {key: wanted.get(key) for key in keys}


class ArchiveCoders:
    """Keeps the loaded model and its coder between streams, and checks each stream's header against them."""

    def __init__(self, model: str | LoadedModel | None, threads: int, device: str, force: bool) -> None:
        self._model_spec = model
        self._device = device
        self._force = force
        self._threads = threads
        self._model: LoadedModel | None = model if isinstance(model, LoadedModel) else None
        self._coder: LlmCoder | None = None
        self._coder_key: tuple | None = None
        self._prompt_record: dict | None = None  # the steering record the engine holds now

    def coder_for(self, header: dict) -> LlmCoder:
        """Load the model (once) and check it and the numerics against the header."""
        wanted = header["model"]
        if self._model is None:
            spec = self._model_spec
            if spec is None:
                found = find_cached_model(wanted)
                spec = str(found) if found else str(wanted.get("name"))
            try:
                self._model = cache.load(spec)  # type: ignore[arg-type]
            except ModelError as exc:
                raise ModelError(f"this archive needs model {wanted.get('name')!r}: {exc}") from None
        have = _identity(self._model.weights_sha256, self._model.tokenizer.sha256, wanted)
        for key, value in _wanted(wanted).items():
            if have[key] != value:
                raise ModelMismatchError(
                    f"archive was made with model {wanted.get('name')!r} ({key} {str(value)[:12]}...), "
                    f"but model {self._model.name!r} ({have[key][:12]}...) is loaded"
                )
        numerics = header_field(header, "numerics", dict)
        kind = numerics.get("engine")
        if kind == "exact":
            if numerics.get("version") != NUMERICS_VERSION:
                raise ArchiveError(
                    f"archive uses exact numerics version {numerics.get('version')!r}; "
                    f"this llmpipe implements version {NUMERICS_VERSION} (a newer llmpipe may decode it)"
                )
            threads, batch = self._threads, 0  # exact results depend on neither
            dtype, load_in_8bit = "float32", False
        elif kind == "float":
            threads = header_field(header, "numerics.threads", int)
            batch = header_field(header, "numerics.batch", int)
            if not (1 <= threads <= 256 and 1 <= batch <= MAX_ROWS):
                raise ArchiveError("corrupt header: threads or batch out of range")
            dtype = header_field(header, "numerics.dtype", str)
            load_in_8bit = numerics.get("load_in_8bit", False) is True
            if dtype not in FLOAT_DTYPES:
                raise ArchiveError(f"unsupported float dtype {dtype!r}")
            mine = numeric_fingerprint(threads, batch, dtype, load_in_8bit, usable_device(self._device))
            differ = sorted(k for k in set(mine) | set(numerics) if mine.get(k) != numerics.get(k))
            if differ and not self._force:
                detail = ", ".join(f"{k} {numerics.get(k)!r} here {mine.get(k)!r}" for k in differ)
                raise ModelMismatchError(
                    f"archive was made with float numerics that differ from this machine ({detail}); "
                    "it may not decode here (use -f to try anyway)"
                )
        else:
            raise ArchiveError(f"unsupported numerics engine {kind!r}")
        key = (self._model.weights_sha256, kind, threads, dtype, load_in_8bit)
        if self._coder is None or self._coder_key != key:
            engine = create_engine(kind, self._model, threads, batch, self._device, dtype, load_in_8bit)
            self._coder = LlmCoder(engine, self._model.tokenizer)
            self._coder_key = key
            self._prompt_record = None
        if header.get("steering") != self._prompt_record:  # each stream of a concatenation has its own
            config = self._model.config
            prompt = prompt_from_record(header.get("steering"), config.hidden_size, config.vocab_size)
            self._coder.engine.set_prompt(prompt)
            self._prompt_record = header.get("steering")
        return self._coder
