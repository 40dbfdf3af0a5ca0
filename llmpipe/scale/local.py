"""Workers as processes on this machine (``--workers N``): nothing to install beyond llmpipe itself.

Each worker is a fresh interpreter (``spawn``: no threads or model state
inherited from the driver) that builds its ``JobServer`` and answers the
driver's jobs over a pipe. A worker killed mid-job shows as an ended pipe,
``WorkerLost``: the pool starts a new process and runs the job again.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
from multiprocessing.connection import Connection

from llmpipe.pipeline.jobs import Job
from llmpipe.scale.pool import WorkerLost
from llmpipe.scale.serve import JobServer, Outcome, WorkerSpec

_CONTEXT = multiprocessing.get_context("spawn")


class ProcessWorker:
    """One worker process; started again by ``start`` after it was lost."""

    def __init__(self, spec: WorkerSpec, number: int) -> None:
        self.name = f"worker {number}"
        self._spec = spec
        self._process: multiprocessing.process.BaseProcess | None = None
        self._connection: Connection | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> Outcome:
        self.stop()
        driver_end, worker_end = _CONTEXT.Pipe()
        self._process = _CONTEXT.Process(target=_serve, args=(worker_end, self._spec), name=self.name, daemon=True)
        self._process.start()
        worker_end.close()
        self._connection = driver_end
        return self._call(("hello", None))

    def run(self, job: Job) -> Outcome:
        return self._call(("run", job))

    def stop(self) -> None:
        """Kill the process (a job it was running fails with ``WorkerLost``) and close the pipe; the pool's
        thread and its closing may both call it."""
        process, connection = self._process, self._connection
        self._connection = None
        if process is not None and process.is_alive():
            process.kill()
            process.join()
        if connection is not None:
            with contextlib.suppress(OSError):  # closed already by the other caller
                connection.close()

    def _call(self, message: tuple[str, Job | None]) -> Outcome:
        connection = self._connection
        if connection is None:
            raise WorkerLost(self.name)
        try:
            connection.send(message)
            return connection.recv()
        except (EOFError, OSError) as exc:  # the process ended, or stop() closed the pipe
            raise WorkerLost(self.name) from exc


def _serve(connection: Connection, spec: WorkerSpec) -> None:
    """A worker process's whole life: answer ``hello`` and ``run`` messages until the driver hangs up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle; it stops the workers
    server = JobServer(spec)
    while True:  # until the driver hangs up, or dies: then its end of the pipe closes
        try:
            kind, job = connection.recv()
            connection.send(server.hello() if kind == "hello" else server.run(job))
        except (EOFError, OSError):
            return
