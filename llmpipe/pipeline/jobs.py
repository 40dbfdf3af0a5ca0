"""The units of work a run hands out, and the one way both directions hand them out.

A window to code (:class:`CodeWindow`) and a group's LLM rows to decode
(:class:`DecodeRows`) depend on nothing but their own bytes and the stream's
settings: exact numerics give the same bits on any worker. The compressor
and the decompressor therefore submit every window or group to a
:class:`Dispatch` and write the results in input order, whatever ran them.
In one process the dispatch runs each job at once (:class:`Inline`, nothing
ahead); with ``--workers`` or ``--ray`` a pool of workers runs them
(``llmpipe.scale``), each with its own loaded model, while the driver keeps
a bounded number of jobs ahead of the one it writes next and checks what
comes back before writing it.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class CodeWindow:
    """Code ``window`` into one block, steered by the prompt the stream header records (``steering``)."""

    window: bytes
    steering: dict | None


@dataclass(frozen=True)
class DecodeRows:
    """Decode LLM rows (``payloads``, their symbol ``counts``) of a stream with this ``header`` and format
    ``version`` into their bytes, as one lockstep group."""

    header: dict
    version: int
    payloads: tuple[bytes, ...]
    counts: tuple[int, ...]


Job = CodeWindow | DecodeRows


class Runner(Protocol):
    """What runs jobs: a ``Compressor`` (``CodeWindow``) or a ``Decompressor`` (``DecodeRows``)."""

    def run(self, job: Job) -> object: ...


class Dispatch(Protocol):
    """Where jobs run. ``ahead``: how many submitted jobs the driver may hold beyond the one it waits for
    (its memory bound); ``remote``: whether results come from another process, so that one that fails its
    check is worth asking for again."""

    ahead: int
    remote: bool

    def submit(self, job: Job) -> Future: ...


class Inline:
    """Runs each job in this process as it is submitted."""

    ahead = 0
    remote = False

    def __init__(self, runner: Runner) -> None:
        self._runner = runner

    def submit(self, job: Job) -> Future:
        future: Future = Future()
        try:
            future.set_result(self._runner.run(job))
        except Exception as exc:  # raised again, unchanged, by future.result()
            future.set_exception(exc)
        return future
