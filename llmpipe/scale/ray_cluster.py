"""Workers as Ray actors (``--ray [ADDRESS]``): one per worker slot of a running cluster, each loading the model once.

Ray is an optional extra (``pip install 'llmpipe[ray]'``) and is imported
only here. An actor that dies (its process killed, its node gone) shows as a
Ray actor error, ``WorkerLost``: the pool starts a new actor, wherever the
cluster places it, and runs the job again. Every node needs llmpipe (the same
version: the driver compares each worker's settings with its own) and the
model, or the means to fetch it.
"""

from __future__ import annotations

import contextlib
from types import ModuleType

from llmpipe.errors import UsageError
from llmpipe.pipeline.jobs import Job
from llmpipe.scale.pool import WorkerLost
from llmpipe.scale.serve import JobServer, Outcome, WorkerSpec

INSTALL_HINT = "--ray needs Ray: pip install 'llmpipe[ray]'"


def connect(address: str) -> tuple[ModuleType, bool]:
    """Ray, connected to the cluster at ``address`` (``auto``: the one this machine belongs to); and whether
    this call connected (the caller then disconnects)."""
    try:
        import ray
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    if ray.is_initialized():
        return ray, False
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    except ConnectionError as exc:
        raise UsageError(f"--ray {address}: no Ray cluster there ({exc})") from None
    return ray, True


def slots(ray: ModuleType, threads: int, gpus: bool) -> int:
    """How many workers the cluster holds: one per GPU, or one per ``threads`` CPUs (0: not even one)."""
    resources = ray.cluster_resources()
    return int(resources.get("GPU", 0)) if gpus else int(resources.get("CPU", 0)) // threads


def actor_class(ray: ModuleType, threads: int, gpus: bool):
    """``JobServer`` as a Ray actor class holding ``threads`` CPUs (or a GPU), made once for all the slots."""
    return ray.remote(JobServer).options(num_cpus=threads, num_gpus=1 if gpus else 0, max_restarts=0)


class RayWorker:
    """One actor slot; ``start`` places a new actor after a loss."""

    def __init__(self, ray: ModuleType, actors, spec: WorkerSpec, number: int) -> None:
        self.name = f"ray worker {number}"
        self._ray = ray
        self._spec = spec
        self._actor_class = actors  # from actor_class()
        self._actor = None

    def start(self) -> Outcome:
        self.stop()
        self._actor = self._actor_class.remote(self._spec)
        return self._get(self._actor.hello.remote())

    def run(self, job: Job) -> Outcome:
        if self._actor is None:
            raise WorkerLost(self.name)
        return self._get(self._actor.run.remote(job))

    def stop(self) -> None:
        """Kill the actor (a job it was running fails with ``WorkerLost``)."""
        actor, self._actor = self._actor, None
        if actor is not None:
            with contextlib.suppress(Exception):  # already gone with its node, or Ray shutting down
                self._ray.kill(actor, no_restart=True)

    def _get(self, reference) -> Outcome:
        exceptions = self._ray.exceptions
        try:
            return self._ray.get(reference)
        except exceptions.RayTaskError as exc:  # JobServer answers errors itself: this is a bug
            return "bug", str(exc)
        except exceptions.RayError as exc:  # the actor died, its node left, its result was lost
            raise WorkerLost(self.name) from exc
