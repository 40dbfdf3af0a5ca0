"""A pool of workers behind the ``jobs.Dispatch`` interface: ordered results, bounded memory, lost workers replaced.

One thread per worker takes the lowest-numbered waiting job, sends it, and
waits for the answer. A worker that dies or leaves (``WorkerLost``: its
process was killed, its node left the cluster) is started again and its job
goes back to the front of the queue, for whichever worker is free first, up
to ``attempts`` tries per job; so a killed worker costs that job's time, not
the archive. The driver bounds its memory by holding at most ``ahead`` jobs
beyond the one it is waiting for (``jobs.Dispatch``).
"""

from __future__ import annotations

import itertools
import math
import threading
from concurrent.futures import Future
from queue import Empty, PriorityQueue
from typing import Protocol

from llmpipe.errors import LlmpipeError
from llmpipe.pipeline.jobs import Job
from llmpipe.scale.serve import Outcome

JOBS_AHEAD_PER_WORKER = 2
"""Jobs the driver may hold per worker beyond the one it writes next: one running, one waiting, so that a
worker never idles while the driver reads or writes."""


class WorkerLost(Exception):
    """A worker ended before answering (its process died, its node left)."""


class Worker(Protocol):
    """One worker slot: a process here or an actor on a cluster, holding a loaded model."""

    name: str

    def start(self) -> Outcome:
        """Start (again, after a loss) and load the model: ``JobServer.hello``'s answer."""
        ...

    def run(self, job: Job) -> Outcome: ...

    def stop(self) -> None: ...


class WorkerPool:
    """Runs jobs on workers; ``submit`` returns a future, answered in any order, read by the driver in order."""

    remote = True

    def __init__(self, workers: list[Worker], attempts: int = 3) -> None:
        if not workers:
            raise LlmpipeError("no workers")
        self.ahead = JOBS_AHEAD_PER_WORKER * len(workers)
        self.lost = 0
        """How many times a worker was lost and started again (its job run elsewhere)."""
        self.hellos: list[dict] = []
        """What each worker said when it started (``JobServer.hello``): pid, host, settings."""
        self._workers = workers
        self._attempts = attempts
        self._queue: PriorityQueue = PriorityQueue()  # (sequence, attempt, job, future); None job: stop
        self._numbers = itertools.count()
        self._lock = threading.Lock()
        self._ready = threading.Barrier(len(workers) + 1)
        self._failure: BaseException | None = None
        self._closing = False
        self._threads = [threading.Thread(target=self._serve, args=(w,), daemon=True) for w in workers]
        for thread in self._threads:
            thread.start()
        self._ready.wait()
        if self._failure is not None:
            self.close()
            raise self._failure

    def submit(self, job: Job) -> Future:
        future: Future = Future()
        if self._failure is not None:
            future.set_exception(self._failure)
        else:
            self._queue.put((next(self._numbers), 0, job, future))
        return future

    def close(self) -> None:
        """Stop every worker now: jobs still waiting are cancelled, running ones abandoned."""
        self._closing = True
        self._cancel_waiting(None)
        for _ in self._threads:
            self._queue.put((math.inf, 0, None, None))
        for worker in self._workers:
            worker.stop()
        for thread in self._threads:
            thread.join()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def _serve(self, worker: Worker) -> None:
        try:
            started = self._start(worker)
        finally:
            self._ready.wait()
        try:
            while started:
                number, attempt, job, future = self._queue.get()
                if job is None:
                    return
                try:
                    outcome = worker.run(job)
                except WorkerLost:
                    if self._closing:
                        return
                    self._lost(worker, number, attempt, job, future)
                    started = self._start(worker)
                    continue
                _settle(future, outcome)
            self._cancel_waiting(self._failure)  # this worker could not start again: nor can the run go on
        finally:
            worker.stop()

    def _start(self, worker: Worker) -> bool:
        """Start ``worker`` (again); a worker that cannot start fails the pool with its reason."""
        for _ in range(self._attempts):
            try:
                kind, value = worker.start()
            except WorkerLost:
                continue
            if kind == "ok":
                with self._lock:
                    self.hellos.append(value)
                return True
            self._fail(value if kind == "error" else RuntimeError(f"{worker.name} failed to start:\n{value}"))
            return False
        self._fail(LlmpipeError(f"{worker.name} died {self._attempts} times while starting"))
        return False

    def _lost(self, worker: Worker, number: int, attempt: int, job: Job, future: Future) -> None:
        with self._lock:
            self.lost += 1
        if attempt + 1 < self._attempts:
            self._queue.put((number, attempt + 1, job, future))  # its number puts it first in the queue
        else:
            future.set_exception(LlmpipeError(f"workers were lost {self._attempts} times on one job ({worker.name})"))

    def _cancel_waiting(self, reason: BaseException | None) -> None:
        """Take every waiting job off the queue: cancelled, or failed with ``reason``."""
        waiting = []
        while True:
            try:
                waiting.append(self._queue.get_nowait())
            except Empty:
                break
        for entry in waiting:
            _, _, job, future = entry
            if job is None:
                self._queue.put(entry)  # a stop for another thread
            elif reason is None:
                future.cancel()
            else:
                future.set_exception(reason)

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self._failure is None:
                self._failure = exc


def _settle(future: Future, outcome: Outcome) -> None:
    kind, value = outcome
    if kind == "ok":
        future.set_result(value)
    elif kind == "error" and isinstance(value, BaseException):
        future.set_exception(value)
    else:
        future.set_exception(RuntimeError(f"a worker failed:\n{value}"))
