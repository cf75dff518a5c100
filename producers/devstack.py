"""The local stack, started on demand: redis-server, an S3 server (moto), the fal emulator,
Celery workers per queue and Flower. Used by `lipsync demo`, `lipsync dev up` and the tests.

Whatever is already listening is reused; whatever this module starts, it stops.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), 0.5):
        return True
    return False


def wait_for_port(port: int, timeout: float = 20.0, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(port):
            return
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the process meant to listen on port {port} exited ({process.returncode})")
        time.sleep(0.05)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout} s")


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)
    # A process started in its own session leads a group: take along children it left (a
    # prefork pool whose parent was killed). Not a group leader: no such group, nothing happens.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


# redis ---------------------------------------------------------------------------------
@dataclass
class RedisServer:
    port: int
    workdir: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """(Re)start on the same port and data dir: AOF brings back what was written."""
        self.process = spawn_redis(self.port, self.workdir)
        wait_for_port(self.port, process=self.process)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)


def spawn_redis(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    return subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(workdir),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",  # every acknowledged write on disk: see config.celery
            "--save",
            "",
            "--maxmemory-policy",
            "noeviction",
            "--loglevel",
            "warning",
        ],  # fmt: skip
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


@contextlib.contextmanager
def start_redis(port: int | None = None) -> Iterator[RedisServer]:
    port = port or free_port()
    with tempfile.TemporaryDirectory(prefix="lipsync-redis-") as workdir:
        server = RedisServer(port, Path(workdir), spawn_redis(port, Path(workdir)))
        try:
            wait_for_port(port, process=server.process)
            yield server
        finally:
            stop_process(server.process)


# S3 ------------------------------------------------------------------------------------
@dataclass
class S3Server:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "LIPSYNC_S3_ENDPOINT_URL": self.url,
        }

    def start(self) -> None:
        self.process = spawn_moto(self.port)
        wait_for_s3(self.url, self.port, self.process)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)


def spawn_moto(port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"},
        start_new_session=True,
    )


def wait_for_s3(url: str, port: int, process: subprocess.Popen[bytes] | None = None) -> None:
    wait_for_port(port, timeout=30, process=process)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/moto-api/", timeout=2).status_code < 500:
                return
        time.sleep(0.1)
    raise TimeoutError(f"the S3 server at {url} did not answer")


@contextlib.contextmanager
def start_s3(port: int | None = None) -> Iterator[S3Server]:
    """moto in server mode: a real S3-compatible HTTP server."""
    port = port or free_port()
    server = S3Server(port, spawn_moto(port))
    try:
        wait_for_s3(server.url, port, server.process)
        yield server
    finally:
        stop_process(server.process)


# the emulator, workers, flower -------------------------------------------------------------
def spawn_emulator(port: int, *args: str, log: IO[bytes] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "emulator", "--host", "127.0.0.1", "--port", str(port), *args],
        stdout=log or subprocess.DEVNULL,
        stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
        start_new_session=True,
    )


@dataclass
class WorkerSpec:
    queues: str
    pool: str
    concurrency: int
    name: str


# Two workers, one per queue, as the design asks: media I/O never starves polling. Transfers
# are I/O-bound (S3, HTTP, a probe of a spooled file): threads, sized for I/O (bench/README.md).
DEFAULT_WORKERS = (
    WorkerSpec("transfer", "threads", 16, "transfer"),
    WorkerSpec("api", "threads", 8, "api"),
)


def spawn_worker(spec: WorkerSpec, env: Mapping[str, str], log: IO[bytes] | None = None) -> subprocess.Popen[bytes]:
    """A worker; its /metrics port is LIPSYNC_METRICS_PORT from `env`, or a free one (see `metrics_port`)."""
    env = {"LIPSYNC_METRICS_PORT": str(free_port()), **env}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers.app",
            "worker",
            "--queues",
            spec.queues,
            "--pool",
            spec.pool,
            "--concurrency",
            str(spec.concurrency),
            "--hostname",
            f"{spec.name}-{secrets.token_hex(3)}@%h",
            "--loglevel",
            "INFO",
            "--without-mingle",
            "--without-gossip",
        ],  # fmt: skip
        env={**os.environ, **env},
        stdout=log or subprocess.DEVNULL,
        stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
        start_new_session=True,
    )
    _METRICS_PORTS[process.pid] = int(env["LIPSYNC_METRICS_PORT"])
    return process


_METRICS_PORTS: dict[int, int] = {}


def metrics_port(process: subprocess.Popen[bytes]) -> int:
    """The /metrics port of a worker started by `spawn_worker` (0: metrics off)."""
    return _METRICS_PORTS.get(process.pid, 0)


def spawn_flower(
    port: int, env: Mapping[str, str], basic_auth: str, log: IO[bytes] | None = None
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers.app",
            "flower",
            f"--port={port}",
            "--address=127.0.0.1",
            f"--basic-auth={basic_auth}",
            "--max-tasks=10000",
        ],  # fmt: skip
        env={**os.environ, **env},
        stdout=log or subprocess.DEVNULL,
        stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
        start_new_session=True,
    )


@dataclass
class LocalStack:
    """Everything a job needs on one machine, and the environment that points at it."""

    env: dict[str, str]
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    flower_url: str | None = None
    emulator_url: str | None = None
    metrics_urls: list[str] = field(default_factory=list)
    logdir: Path | None = None
    redis_dir: Path | None = None

    def add(self, name: str, process: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        self.names.append(name)
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in reversed(self.processes):
            stop_process(process)
        self.processes.clear()
        self.names.clear()
        if self.redis_dir is not None:
            shutil.rmtree(self.redis_dir, ignore_errors=True)


def ensure_bucket(env: dict[str, str]) -> None:
    """Create the stack's bucket, with the stack's settings and credentials (not this process's)."""
    from config.settings import Settings
    from lipsync.storage import Storage

    saved = dict(os.environ)
    os.environ.update(env)
    try:
        Storage(Settings()).ensure_bucket()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _log(logdir: Path, name: str) -> IO[bytes]:
    return (logdir / f"{name}.log").open("ab")


def start_stack(
    logdir: Path,
    *,
    emulator_args: tuple[str, ...] = ("--latency", "1-3"),
    flower: bool = True,
    prefix: str | None = None,
    redis_dir: Path | None = None,
) -> LocalStack:
    """Start every service and one worker per queue; on failure, stop what was started."""
    logdir.mkdir(parents=True, exist_ok=True)
    stack = LocalStack(env={}, logdir=logdir)
    try:
        if redis_dir is None:
            redis_dir = Path(tempfile.mkdtemp(prefix="lipsync-redis-"))
        redis_dir.mkdir(parents=True, exist_ok=True)
        stack.redis_dir = redis_dir
        redis_port = free_port()
        wait_for_port(redis_port, process=stack.add("redis", spawn_redis(redis_port, redis_dir)))
        s3_port = free_port()
        wait_for_s3(f"http://127.0.0.1:{s3_port}", s3_port, stack.add("s3", spawn_moto(s3_port)))
        emulator_port = free_port()
        emulator = spawn_emulator(emulator_port, *emulator_args, log=_log(logdir, "emulator"))
        wait_for_port(emulator_port, timeout=30, process=stack.add("emulator", emulator))
        stack.emulator_url = f"http://127.0.0.1:{emulator_port}"
        stack.env = {
            "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "local"),
            "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "local"),
            "AWS_DEFAULT_REGION": "us-east-1",
            "LIPSYNC_S3_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
            "LIPSYNC_S3_BUCKET": "lipsync-local",
            "LIPSYNC_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "LIPSYNC_BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
            "LIPSYNC_FAL_QUEUE_URL": stack.emulator_url,
            "FAL_KEY": os.environ.get("FAL_KEY") or "local-emulator-key",
            "LIPSYNC_ALLOW_PRIVATE_URLS": "127.0.0.1,localhost",
            "LIPSYNC_KEY_PREFIX": prefix or "lipsync",
        }
        # Before the workers: a worker refuses to start without its bucket (workers.preflight).
        ensure_bucket(stack.env)
        for spec in DEFAULT_WORKERS:
            port = free_port()
            worker_env = {**stack.env, "LIPSYNC_METRICS_PORT": str(port)}
            stack.add(f"worker-{spec.name}", spawn_worker(spec, worker_env, log=_log(logdir, f"worker-{spec.name}")))
            stack.metrics_urls.append(f"http://127.0.0.1:{port}/metrics")
        if flower:
            flower_port = free_port()
            auth = f"lipsync:{secrets.token_urlsafe(12)}"
            stack.add("flower", spawn_flower(flower_port, stack.env, auth, log=_log(logdir, "flower")))
            stack.flower_url = f"http://{auth}@127.0.0.1:{flower_port}"
    except BaseException:
        stack.stop()
        raise
    return stack


@contextlib.contextmanager
def local_stack(
    logdir: Path,
    *,
    emulator_args: tuple[str, ...] = ("--latency", "1-3"),
    flower: bool = True,
    prefix: str | None = None,
) -> Iterator[LocalStack]:
    """Start every service and two workers; stop what was started on exit."""
    stack = start_stack(logdir, emulator_args=emulator_args, flower=flower, prefix=prefix)
    try:
        yield stack
    finally:
        stack.stop()
