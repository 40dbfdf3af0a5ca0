"""--ray: a local Ray cluster of two worker slots on 127.0.0.1, started and stopped by these tests.

The archive is the one a single process writes, in both directions, with a
worker killed mid-run too; ``--range`` reads through the workers; without
Ray installed ``--ray`` says in one line how to get it.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from llmpipe.pipeline.compress import Compressor
from llmpipe.scale.launch import compressor_on_workers
from llmpipe.scale.ray_cluster import INSTALL_HINT
from tests.cli.test_cli import ROOT, run
from tests.tiny_model import DATA

TEXT = (DATA / "alice_chapter1.txt").read_bytes()
SETTINGS = {"chunk_size": 256, "batch": 2, "threads": 1}
RAY = Path(sys.executable).parent / "ray"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tiny_model):
    """A head node on 127.0.0.1 with 2 CPUs (its workers inherit this process's model cache); stopped
    whatever happens."""
    pytest.importorskip("ray", reason="Ray is not installed (make test installs llmpipe[ray])")
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    start = [str(RAY), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2"]
    start += ["--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"]
    start += ["--object-store-memory=100000000"]
    try:
        subprocess.run(start, check=True, env=env, capture_output=True, timeout=180)
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(RAY), "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def single(tiny_model):
    return Compressor(tiny_model, **SETTINGS)


@pytest.mark.parametrize("size", [0, 700, 5300])
def test_a_ray_cluster_writes_and_reads_the_archive_one_process_does(cluster, single, tiny_model_dir, tmp_path, size):
    data = TEXT[:size]
    archive = single.compress(data)
    args = ["--model", str(tiny_model_dir), "--chunk-size", "256", "--batch", "2", "--ray", cluster, "--workers", "2"]
    done = run(["-c", *args], data)
    assert done.returncode == 0, done.stderr
    assert done.stdout == archive
    done = run(["-d", "-c", "--ray", cluster, "--workers", "2"], archive)
    assert done.returncode == 0, done.stderr
    assert done.stdout == data
    if size > 1000:
        (tmp_path / "t.llmp").write_bytes(archive)
        done = run(["-d", "-c", "--ray", cluster, "--range", "600:4100", str(tmp_path / "t.llmp")])
        assert done.returncode == 0, done.stderr
        assert done.stdout == data[600:4100]


def test_an_actor_killed_mid_run_changes_nothing(cluster, single, tiny_model_dir):
    data = TEXT[:12000]
    archive = single.compress(data)
    compressor, pool = compressor_on_workers({"model": str(tiny_model_dir), **SETTINGS}, 2, ray_address=cluster)
    killed: list[int] = []

    def kill_one(stats):
        if stats.blocks == 3 and not killed:
            killed.append(pool.hellos[0]["pid"])
            os.kill(killed[0], signal.SIGKILL)

    try:
        sink = io.BytesIO()
        compressor.compress_stream(io.BytesIO(data), sink, kill_one)
        assert sink.getvalue() == archive
        assert killed and pool.lost >= 1
    finally:
        pool.close()


def test_without_ray_the_option_says_how_to_install_it(tiny_model_dir):
    code = (
        "import sys; sys.modules['ray'] = None; from llmpipe.cli.main import main; "
        f"sys.exit(main(['-c', '--model', {str(tiny_model_dir)!r}, '--ray']))"
    )
    done = subprocess.run([sys.executable, "-c", code], input=b"text", capture_output=True, cwd=ROOT, timeout=300)
    assert done.returncode == 1 and done.stderr.decode().strip() == f"llmpipe: {INSTALL_HINT}"


def test_more_workers_than_the_cluster_has_room_for_are_refused_up_front(cluster, tiny_model_dir):
    done = run(["-c", "--model", str(tiny_model_dir), "--ray", cluster, "--workers", "3"], b"text")
    assert done.returncode == 1
    assert done.stderr.decode().strip() == (
        f"llmpipe: --ray {cluster}: 3 worker(s) need 3 CPUs (1 per worker); the cluster has room for 2"
    )
