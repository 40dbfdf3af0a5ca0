"""A compressor or decompressor whose windows or groups run on workers: local processes or a Ray cluster.

The driver keeps its own ``Compressor`` for what is decided once per stream
(the steering decision and its vector, the stream header) and for
``--resume``; the workers get the same settings with every machine-dependent
default resolved (the batch, their share of the threads) and steering
handed to them per window. Segments are the compressor's windows, cut by a
rule that depends only on the input and the settings, so the archive is the
one a single process writes. Workers need exact numerics: a float archive
records one machine's arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable

from llmpipe.defaults import resolve_threads
from llmpipe.errors import UsageError
from llmpipe.pipeline.compress import Compressor
from llmpipe.pipeline.decompress import Decompressor
from llmpipe.scale.local import ProcessWorker
from llmpipe.scale.pool import Worker, WorkerPool
from llmpipe.scale.serve import WorkerSpec


class ClusterPool(WorkerPool):
    """A pool of Ray actors; closing it also disconnects from the cluster if it connected."""

    def __init__(self, workers: list[Worker], disconnect: Callable[[], None] | None) -> None:
        self._disconnect = disconnect
        try:
            super().__init__(workers)
        except BaseException:
            if disconnect:
                disconnect()
            raise

    def close(self) -> None:
        super().close()
        if self._disconnect:
            self._disconnect()
            self._disconnect = None


def start_workers(spec: WorkerSpec, workers: int | None, ray_address: str | None, threads: int) -> WorkerPool:
    """Start ``workers`` workers with ``spec`` (``threads`` compute threads in all, shared out among local
    workers; on a cluster each worker has ``threads`` of its own, one when 0, and ``workers`` None means one
    per slot of the cluster)."""
    if spec.options.get("numerics", "exact") != "exact":
        raise UsageError("--workers and --ray need exact numerics")
    gpus = str(spec.options.get("device", "cpu")).startswith("cuda")
    if ray_address is None:
        if not workers or workers < 1:
            raise UsageError("--workers must be at least 1")
        total = resolve_threads(threads)
        share = max(1, total // workers)
        local = WorkerSpec(spec.direction, {**spec.options, "threads": share})
        return WorkerPool([ProcessWorker(local, n + 1) for n in range(workers)])
    from llmpipe.scale.ray_cluster import RayWorker, actor_class, connect, slots

    ray, connected_here = connect(ray_address)
    each = threads or 1
    room = slots(ray, each, gpus)
    count = workers or room
    if not 1 <= count <= room:  # Ray would wait for room forever
        if connected_here:
            ray.shutdown()
        need = f"{count or 1} GPU(s)" if gpus else f"{(count or 1) * each} CPUs ({each} per worker)"
        raise UsageError(f"--ray {ray_address}: {count or 1} worker(s) need {need}; the cluster has room for {room}")
    remote = WorkerSpec(spec.direction, {**spec.options, "threads": each})
    actors = actor_class(ray, each, gpus)
    workers_on_ray: list[Worker] = [RayWorker(ray, actors, remote, n + 1) for n in range(count)]
    return ClusterPool(workers_on_ray, ray.shutdown if connected_here else None)


def compressor_on_workers(
    options: dict, workers: int | None, ray_address: str | None = None
) -> tuple[Compressor, WorkerPool]:
    """A driver ``Compressor(**options)`` whose windows are coded by a started pool (close it when done); every
    worker's settings are checked against the driver's before any window is handed out."""
    options = dict(options)
    model = options.pop("model", None)
    threads = options.get("threads", 0)
    driver = Compressor(model, **options)
    kept = {k: v for k, v in options.items() if k not in ("steer_epochs", "steer_seconds")}  # the driver steers
    worker_options = {**kept, "model": model, "batch": driver.batch, "memory": None, "steer": "none", "log": None}
    pool = start_workers(WorkerSpec("compress", worker_options), workers, ray_address, threads)
    expected = _without_steering(driver.header())
    for hello in pool.hellos:
        if _without_steering(hello["header"]) != expected:
            differ = sorted(k for k in expected if expected[k] != hello["header"].get(k))
            pool.close()
            raise UsageError(f"a worker on {hello['host']} has other settings ({', '.join(differ)})")
    driver.dispatch = pool
    return driver, pool


def decompressor_on_workers(
    options: dict, workers: int | None, ray_address: str | None = None
) -> tuple[Decompressor, WorkerPool]:
    """A driver ``Decompressor(**options)`` whose groups are decoded by a started pool (close it when done);
    each worker checks every stream's model and numerics as a single decoder does."""
    options = dict(options)
    model = options.pop("model", None)
    driver = Decompressor(model, **options)
    pool = start_workers(
        WorkerSpec("decompress", {**options, "model": model}), workers, ray_address, options.get("threads", 0)
    )
    driver.dispatch = pool
    return driver, pool


def _without_steering(header: dict) -> dict:
    return {k: v for k, v in header.items() if k != "steering"}
