"""WorkerPool with workers in this process: order, retries after a lost worker, start failures, closing."""

from __future__ import annotations

import threading
import time

import pytest

from llmpipe.errors import LlmpipeError, ModelError
from llmpipe.pipeline.jobs import CodeWindow
from llmpipe.scale.pool import JOBS_AHEAD_PER_WORKER, WorkerLost, WorkerPool


class FakeWorker:
    """Answers a job with its window reversed, after ``delay`` seconds; ``lose`` says which windows it dies on
    (once each), ``start_error`` what its start answers."""

    def __init__(self, name: str, delay: float = 0.0, lose: set[bytes] | None = None, start_error=None) -> None:
        self.name = name
        self.delay = delay
        self.lose = set(lose or ())
        self.start_error = start_error
        self.starts = 0
        self.ran: list[bytes] = []
        self.stopped = threading.Event()

    def start(self):
        self.starts += 1
        if self.start_error is not None:
            return self.start_error
        return "ok", {"pid": self.starts, "host": self.name, "header": None}

    def run(self, job):
        time.sleep(self.delay)
        if job.window in self.lose:
            self.lose.discard(job.window)
            raise WorkerLost(self.name)
        self.ran.append(job.window)
        return "ok", job.window[::-1]

    def stop(self) -> None:
        self.stopped.set()


def jobs(count: int) -> list[CodeWindow]:
    return [CodeWindow(f"window {i}".encode(), None) for i in range(count)]


def test_results_come_back_for_their_jobs_whatever_worker_ran_them():
    workers = [FakeWorker("a", 0.002), FakeWorker("b", 0.005)]
    with WorkerPool(workers) as pool:
        assert pool.ahead == JOBS_AHEAD_PER_WORKER * 2 and pool.remote
        futures = [pool.submit(job) for job in jobs(20)]
        assert [f.result() for f in futures] == [job.window[::-1] for job in jobs(20)]
    assert workers[0].ran and workers[1].ran  # both took jobs
    assert all(w.stopped.is_set() for w in workers)


def test_a_lost_worker_is_started_again_and_its_job_run_again():
    lost = jobs(10)[3].window
    workers = [FakeWorker("a", 0.001, lose={lost}), FakeWorker("b", 0.001, lose={lost})]
    with WorkerPool(workers) as pool:
        futures = [pool.submit(job) for job in jobs(10)]
        assert [f.result() for f in futures] == [job.window[::-1] for job in jobs(10)]
        assert pool.lost >= 1
    assert sum(w.starts for w in workers) == 2 + pool.lost


def test_a_job_lost_on_every_attempt_fails_with_one_line():
    worker = FakeWorker("a")
    job = jobs(1)[0]
    worker.run = lambda _job: (_ for _ in ()).throw(WorkerLost("a"))
    with WorkerPool([worker], attempts=2) as pool, pytest.raises(LlmpipeError, match="lost 2 times on one job"):
        pool.submit(job).result()


def test_a_worker_that_cannot_start_stops_the_pool_with_its_error():
    workers = [FakeWorker("a"), FakeWorker("b", start_error=("error", ModelError("no such model")))]
    with pytest.raises(ModelError, match="no such model"):
        WorkerPool(workers)
    assert all(w.stopped.is_set() for w in workers)


def test_errors_reach_the_driver_and_bugs_keep_their_traceback():
    worker = FakeWorker("a")
    worker.run = lambda job: ("error", ModelError("wrong model")) if job.window == b"x" else ("bug", "Traceback: boom")
    with WorkerPool([worker]) as pool:
        with pytest.raises(ModelError, match="wrong model"):
            pool.submit(CodeWindow(b"x", None)).result()
        with pytest.raises(RuntimeError, match="boom"):
            pool.submit(CodeWindow(b"y", None)).result()


def test_closing_cancels_waiting_jobs_and_stops_workers_now():
    worker = FakeWorker("a", delay=0.05)
    pool = WorkerPool([worker])
    futures = [pool.submit(job) for job in jobs(50)]
    started = time.perf_counter()
    pool.close()
    assert time.perf_counter() - started < 1.0
    assert any(f.cancelled() for f in futures) and worker.stopped.is_set()
