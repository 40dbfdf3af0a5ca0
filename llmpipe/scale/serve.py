"""What a worker runs: a loaded compressor or decompressor that answers jobs, never raising for the user's errors.

The same :class:`JobServer` serves a local worker process (``local``) and a
Ray actor (``ray_cluster``); both send back ``("ok", result)`` or
``("error", exception)``, so an :class:`LlmpipeError` a worker meets (a
model it cannot load, a damaged row) reaches the driver as the same one-line
error, and a bug keeps its traceback.
"""

from __future__ import annotations

import os
import socket
import traceback
from dataclasses import dataclass

from llmpipe.errors import LlmpipeError
from llmpipe.pipeline.compress import Compressor
from llmpipe.pipeline.decompress import Decompressor
from llmpipe.pipeline.jobs import Job, Runner

Outcome = tuple[str, object]
"""``("ok", result)``, ``("error", LlmpipeError)`` or ``("bug", traceback text)``."""


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker builds: a ``Compressor`` or ``Decompressor`` with these keyword arguments (the driver
    resolves every default that could differ between machines, such as the batch, before handing it out)."""

    direction: str  # "compress" or "decompress"
    options: dict

    def runner(self) -> Runner:
        options = dict(self.options)
        model = options.pop("model", None)
        return Compressor(model, **options) if self.direction == "compress" else Decompressor(model, **options)


class JobServer:
    """Holds one worker's runner; ``hello`` builds it and says who it is, ``run`` answers one job."""

    def __init__(self, spec: WorkerSpec) -> None:
        self._spec = spec
        self._runner: Runner | None = None

    def hello(self) -> Outcome:
        """Load the model; ``("ok", {"pid", "host", "header"})``, the header being a compressor's settings as
        its stream headers would record them without steering (None for a decompressor)."""

        def identify() -> dict:
            if self._runner is None:
                self._runner = self._spec.runner()
            header = self._runner.header() if isinstance(self._runner, Compressor) else None
            return {"pid": os.getpid(), "host": socket.gethostname(), "header": header}

        return _answer(identify)

    def run(self, job: Job) -> Outcome:
        if self._runner is None:
            return "error", LlmpipeError("worker used before hello")
        runner = self._runner
        return _answer(lambda: runner.run(job))


def _answer(work) -> Outcome:
    try:
        return "ok", work()
    except LlmpipeError as exc:
        return "error", exc
    except Exception:  # a bug: its traceback goes back to the driver
        return "bug", traceback.format_exc()
