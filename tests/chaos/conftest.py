"""A stack of its own for the crash and outage suite, so that killing things harms no other test.

Its own redis-server (AOF with `appendfsync always`), its own moto S3 server behind a TCP
proxy that can be switched off, its own emulator and its own `celery worker` processes,
all on free ports. Every secret in it is fake but recognisable, so the secrets test can
scan everything the suite leaves behind for them.

Why `appendfsync always`: the submit claim is written before the POST to fal. With the
default `everysec`, a redis-server killed within a second of that write can come back
without it, and a redelivered submit would then POST again: a second paid request. With
`always`, every write Redis acknowledged is on disk before the worker goes on.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from producers.devstack import (
    DEFAULT_WORKERS,
    WorkerSpec,
    free_port,
    spawn_moto,
    stop_process,
    wait_for_port,
    wait_for_s3,
)
from tests.chaos.proxy import TcpProxy
from tests.conftest import Workers
from tests.fixtures.isolated import aws_env, kill_group, settings_from
from tests.fixtures.services import ATTEMPTS, listens_on

FAKE_FAL_KEY = "fake-fal-key-CHAOS-7c1e55d2a9"
FAKE_AWS_KEY_ID = "AKIACHAOSFAKE7EXAMPLE"
FAKE_AWS_SECRET = "chaos/Fake+Secret/4b8d0e1f2a3c5d6e7f80"
SECRETS = (FAKE_FAL_KEY, FAKE_AWS_KEY_ID, FAKE_AWS_SECRET)
BUCKET = "lipsync-chaos"
PREFIX = "chaos"


def spawn_durable_redis(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed")
    options = "--bind 127.0.0.1 --appendonly yes --appendfsync always --maxmemory-policy noeviction --loglevel warning"
    return subprocess.Popen(
        [binary, "--port", str(port), "--dir", str(workdir), "--save", "", *options.split()],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def on_a_port_of_its_own(spawn: Callable[[int], subprocess.Popen[bytes]]) -> tuple[int, subprocess.Popen[bytes]]:
    """Spawn on a free port; again on another if the port was taken before the child bound it."""
    for _ in range(ATTEMPTS):
        port = free_port()
        process = spawn(port)
        with contextlib.suppress(RuntimeError):
            wait_for_port(port, timeout=30, process=process)
            if listens_on(process.pid, port):
                return port, process
        stop_process(process)
    raise RuntimeError(f"no port of its own after {ATTEMPTS} tries")


@dataclass
class ChaosStack:
    env: dict[str, str]
    redis_port: int
    redis_dir: Path
    redis_process: subprocess.Popen[bytes]
    moto_port: int
    moto_process: subprocess.Popen[bytes]
    s3_proxy: TcpProxy
    emulator: Any
    workers: Workers
    logdir: Path
    starts: int = 0  # worker starts so far, each of which logs "ready." once

    # redis ----------------------------------------------------------------------------
    def kill_redis(self) -> None:
        self.redis_process.send_signal(signal.SIGKILL)
        self.redis_process.wait(10)

    def start_redis(self) -> None:
        self.redis_process = spawn_durable_redis(self.redis_port, self.redis_dir)
        wait_for_port(self.redis_port, process=self.redis_process)

    # workers ----------------------------------------------------------------------------
    def start_worker(self, name: str) -> subprocess.Popen[bytes]:
        return self.start_spec(next(s for s in DEFAULT_WORKERS if s.name == name))

    def start_spec(self, spec: WorkerSpec) -> subprocess.Popen[bytes]:
        self.starts += 1
        return self.workers.start(spec)

    def start_workers(self, wait: bool = True) -> None:
        """Start every worker that is not running (one per queue, as in production)."""
        for spec in DEFAULT_WORKERS:
            running = self.workers.processes.get(spec.name)
            if running is None or running.poll() is not None:
                self.start_worker(spec.name)
        if wait:
            self.wait_workers_ready()

    def wait_workers_ready(self, timeout: float = 60) -> None:
        """Until every worker started so far has logged that it is ready."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.workers.logs().count(" ready.") >= self.starts:
                return
            time.sleep(0.2)
        raise TimeoutError(f"workers did not become ready; logs in {self.logdir}")

    def kill_workers(self) -> None:
        for process in list(self.workers.processes.values()):
            kill_group(process)
        self.workers.processes.clear()

    def settings(self) -> Any:
        return settings_from(self.env)


@pytest.fixture(scope="package")
def chaos_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosStack]:
    from tests.fixtures.emulator import start_emulator

    logdir = tmp_path_factory.mktemp("chaos-logs")
    redis_dir = Path(tempfile.mkdtemp(prefix="lipsync-chaos-redis-"))
    redis_port, redis_process = on_a_port_of_its_own(lambda port: spawn_durable_redis(port, redis_dir))
    moto_port, moto_process = on_a_port_of_its_own(spawn_moto)
    proxy_port = free_port()
    proxy = TcpProxy(moto_port, proxy_port)
    proxy.start()
    emulator = start_emulator(
        "--latency", "2-4", "--concurrency", "64", "--media-mode", "copy", "--hang-seconds", "8",
        "--keys", FAKE_FAL_KEY, log=(logdir / "emulator.log").open("ab"),
    )  # fmt: skip
    env = {
        "AWS_ACCESS_KEY_ID": FAKE_AWS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": FAKE_AWS_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "FAL_KEY": FAKE_FAL_KEY,
        "LIPSYNC_S3_ENDPOINT_URL": f"http://127.0.0.1:{proxy_port}",
        "LIPSYNC_S3_BUCKET": BUCKET,
        "LIPSYNC_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "LIPSYNC_BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
        "LIPSYNC_KEY_PREFIX": PREFIX,
        "LIPSYNC_FAL_QUEUE_URL": emulator.url,
        "LIPSYNC_ALLOW_PRIVATE_URLS": "127.0.0.1",
        "LIPSYNC_POLL_INITIAL_S": "0.5",
        "LIPSYNC_POLL_MAX_S": "2",
        "LIPSYNC_RETRY_BASE_S": "0.5",
        "LIPSYNC_RETRY_MAX_S": "5",
        "LIPSYNC_MAX_RETRIES": "10",
        "LIPSYNC_POLL_LEASE_S": "10",
        "LIPSYNC_TRANSFER_LEASE_S": "20",
        "LIPSYNC_HEARTBEAT_S": "2",
        "LIPSYNC_DISPATCH_INTERVAL_S": "0.1",
        "LIPSYNC_SUBMITS_PER_SECOND": "200",
        "LIPSYNC_HTTP_TIMEOUT_S": "5",
        "LIPSYNC_JOB_DEADLINE_S": "900",
        "LIPSYNC_RUN_DISPATCHER": "true",
        "LIPSYNC_LOG_LEVEL": "INFO",
        "LIPSYNC_TASK_EVENTS": "1",  # test_secrets reads every task's page in Flower
    }
    stack: ChaosStack | None = None
    try:
        wait_for_s3(env["LIPSYNC_S3_ENDPOINT_URL"], proxy_port, moto_process)
        from lipsync.storage import Storage

        with aws_env(env):
            Storage(settings_from(env)).ensure_bucket()
        stack = ChaosStack(
            env=env,
            redis_port=redis_port,
            redis_dir=redis_dir,
            redis_process=redis_process,
            moto_port=moto_port,
            moto_process=moto_process,
            s3_proxy=proxy,
            emulator=emulator,
            workers=Workers(env, logdir),
            logdir=logdir,
        )
        with aws_env(env):
            yield stack
    finally:
        if stack is not None:
            stack.kill_workers()
        emulator.stop()
        proxy.stop()
        stop_process(moto_process)
        # The Redis scenario restarts the server: stop the one running now, not the first.
        stop_process(stack.redis_process if stack is not None else redis_process)
        shutil.rmtree(redis_dir, ignore_errors=True)


@pytest.fixture(scope="package")
def small_media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, float]]:
    from lipsync.samples import make_audio, make_video

    folder = tmp_path_factory.mktemp("chaos-media")
    return {
        "video_short": (make_video(str(folder / "v12.mp4"), 1.2, width=160, height=120), 1.2),
        "video_long": (make_video(str(folder / "v20.mp4"), 2.0, width=160, height=120), 2.0),
        "audio_short": (make_audio(str(folder / "a08.wav"), 0.8), 0.8),
        "audio_long": (make_audio(str(folder / "a16.wav"), 1.6), 1.6),
    }


# figures ------------------------------------------------------------------------------
FIGURES: list[dict[str, Any]] = []


@pytest.fixture(scope="package")
def chaos_figures(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[dict[str, Any]]]:
    yield FIGURES
    if FIGURES:
        target = Path(os.environ.get("LIPSYNC_CHAOS_REPORT") or tmp_path_factory.getbasetemp() / "chaos-figures.json")
        target.write_text(json.dumps(FIGURES, indent=2))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FIGURES:
        return
    write = terminalreporter.write_line
    terminalreporter.section("chaos figures")
    columns = ("scenario", "jobs", "completed", "failed", "faults", "retries", "duplicates", "lost", "recovery_s")
    write("  ".join(f"{c:>10}" if c != "scenario" else f"{c:<32}" for c in columns))
    for row in FIGURES:
        # Faults: what the emulator injected plus what the test did (kills, restarts, outages).
        faults = sum(row.get("faults_injected", {}).values()) + row.get("kills", 0) + row.get("disruptions", 0)
        shown = {**row, "faults": faults, "recovery_s": row.get("recovery_s") if row.get("recovery_s") else "-"}
        cells = [f"{row['scenario']:<32}"] + [f"{shown.get(c, ''):>10}" for c in columns[1:]]
        write("  ".join(cells))
    for row in FIGURES:
        write(f"{row['scenario']}: {json.dumps(row)}")
