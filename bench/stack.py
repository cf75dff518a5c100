"""The benchmark's own stack: redis-server, moto's S3 server and two fal emulators (plain http
for the pipeline, TLS for the official fal-client), plus workers started afresh for each run.

Each run starts from an empty Redis and new worker processes, so CPU, memory and Redis
commands belong to that run alone.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from emulator.control import EmulatorProcess, start_emulator
from lipsync.sentinel import redis_from_url
from producers.devstack import (
    DEFAULT_WORKERS,
    WorkerSpec,
    free_port,
    spawn_moto,
    spawn_redis,
    spawn_worker,
    stop_process,
    wait_for_port,
    wait_for_s3,
)

BUCKET = "lipsync-bench"
# The emulator stands in for fal, so the pipeline's own throttles toward fal are opened wide;
# what is measured is the pipeline, not a rate limit chosen for the real service.
PIPELINE_ENV = {
    "LIPSYNC_SUBMITS_PER_SECOND": "100000",
    "LIPSYNC_MAX_IN_FLIGHT": "1000000",
    "LIPSYNC_FAL_QUEUE_BUFFER": "0",  # no adaptive admission: this emulator's account has no limit
}


@dataclass
class Workers:
    """Worker processes of one run, by name, and where they log."""

    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    def pids(self) -> dict[str, int]:
        return {name: process.pid for name, process in self.processes.items()}

    def stop(self) -> None:
        for process in self.processes.values():
            stop_process(process, timeout=30)
        self.processes.clear()


class BenchStack:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.logdir = workdir / "logs"
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.services: list[subprocess.Popen[bytes]] = []
        self.emulator: EmulatorProcess | None = None
        self.tls_emulator: EmulatorProcess | None = None
        self.env: dict[str, str] = {}
        self._run = 0

    # services ------------------------------------------------------------------
    def start(self) -> BenchStack:
        redis_dir = Path(tempfile.mkdtemp(prefix="bench-redis-", dir=self.workdir))
        self.redis_port = free_port()
        self.services.append(spawn_redis(self.redis_port, redis_dir))
        wait_for_port(self.redis_port, process=self.services[-1])
        self.s3_port = free_port()
        self.services.append(spawn_moto(self.s3_port))
        wait_for_s3(f"http://127.0.0.1:{self.s3_port}", self.s3_port, self.services[-1])
        self.emulator = start_emulator(
            "--latency", "0", "--concurrency", "100000", "--media-mode", "copy",
            log=self._log("emulator"),
        )  # fmt: skip
        self.tls_emulator = start_emulator(
            "--latency", "0", "--concurrency", "100000", "--media-mode", "copy",
            tls=True, log=self._log("emulator-tls"),
        )  # fmt: skip
        redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.env = {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
            "LIPSYNC_S3_ENDPOINT_URL": f"http://127.0.0.1:{self.s3_port}",
            "LIPSYNC_S3_BUCKET": BUCKET,
            "LIPSYNC_REDIS_URL": redis_url,
            "LIPSYNC_BROKER_URL": redis_url,
            "LIPSYNC_FAL_QUEUE_URL": self.emulator.url,
            "FAL_KEY": "bench-emulator-key",
            "LIPSYNC_ALLOW_PRIVATE_URLS": "127.0.0.1,localhost",
            "LIPSYNC_WORK_DIR": str(self._mkdir("spool")),
            **PIPELINE_ENV,
        }
        # This process is the producer: it reads the same settings as the workers.
        os.environ.update(self.env)
        from config.settings import get_settings

        get_settings.cache_clear()
        from lipsync.storage import Storage

        Storage(get_settings()).ensure_bucket()
        self.redis = redis_from_url(redis_url, socket_timeout=30)
        return self

    def stop(self) -> None:
        for server in (self.tls_emulator, self.emulator):
            if server is not None:
                server.stop()
        for process in reversed(self.services):
            stop_process(process)
        self.services.clear()

    def pids(self) -> dict[str, int]:
        """The services' processes, for CPU accounting of where time goes."""
        assert self.emulator is not None and self.tls_emulator is not None
        return {
            "redis": self.services[0].pid,
            "s3": self.services[1].pid,
            "emulator": self.emulator.process.pid,
            "emulator_tls": self.tls_emulator.process.pid,
            "bench": os.getpid(),
        }

    def tls_env(self) -> dict[str, str]:
        """What the official fal-client needs to talk to the TLS emulator instead of fal."""
        assert self.tls_emulator is not None and self.tls_emulator.cert_path is not None
        return {
            "FAL_QUEUE_RUN_HOST": f"127.0.0.1:{self.tls_emulator.port}",
            "SSL_CERT_FILE": str(self.tls_emulator.cert_path),
            "FAL_KEY": "bench-emulator-key",
        }

    # runs ---------------------------------------------------------------------
    def fresh(self, latency: float, *, media_mode: str = "copy") -> None:
        """An empty Redis and emulators with no requests, latency L, no concurrency limit."""
        assert self.emulator is not None and self.tls_emulator is not None
        self.redis.flushall()
        for server in (self.emulator, self.tls_emulator):
            server.reset()
            server.configure(latency=str(latency), concurrency=100000, media_mode=media_mode)

    def start_workers(
        self, specs: Sequence[WorkerSpec] = DEFAULT_WORKERS, env: Mapping[str, str] | None = None
    ) -> Workers:
        self._run += 1
        workers = Workers()
        for spec in specs:
            path = self.logdir / f"run{self._run:03d}-worker-{spec.name}.log"
            workers.logs[spec.name] = path
            workers.processes[spec.name] = spawn_worker(spec, {**self.env, **(env or {})}, log=path.open("ab"))
        wait_ready(workers)
        return workers

    def start_celery(self, app: str, spec: WorkerSpec, env: Mapping[str, str]) -> Workers:
        """A Celery worker of another app (the blocking baseline), logged like ours."""
        self._run += 1
        path = self.logdir / f"run{self._run:03d}-worker-{spec.name}.log"
        command = [
            sys.executable, "-m", "celery", "-A", app, "worker", "--queues", spec.queues,
            "--pool", spec.pool, "--concurrency", str(spec.concurrency),
            "--hostname", f"{spec.name}-{secrets.token_hex(3)}@%h", "--loglevel", "INFO",
            "--without-mingle", "--without-gossip",
        ]  # fmt: skip
        process = subprocess.Popen(
            command,
            env={**os.environ, **self.env, **env},
            stdout=path.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        workers = Workers({spec.name: process}, {spec.name: path})
        wait_ready(workers)
        return workers

    def start_gateway(self) -> tuple[Workers, dict[str, str]]:
        """`lipsync serve` receiving the emulator's signed webhooks; returns it and the workers' env."""
        assert self.emulator is not None
        self._run += 1
        port = free_port()
        env = {
            "LIPSYNC_FAL_WEBHOOK_URL": f"http://127.0.0.1:{port}/v1/fal/webhook",
            "LIPSYNC_FAL_JWKS_URL": f"{self.emulator.url}/.well-known/jwks.json",
        }
        path = self.logdir / f"run{self._run:03d}-gateway.log"
        process = subprocess.Popen(
            [sys.executable, "-m", "producers.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "warning"],
            env={**os.environ, **self.env, **env},
            stdout=path.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        wait_for_port(port, timeout=60, process=process)
        return Workers({"gateway": process}, {"gateway": path}), env

    def _log(self, name: str) -> IO[bytes]:
        return (self.logdir / f"{name}.log").open("ab")

    def _mkdir(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path


def wait_ready(workers: Workers, timeout: float = 90.0) -> None:
    """A Celery worker logs 'ready.' once it consumes; the dispatcher starts then too."""
    deadline = time.monotonic() + timeout
    pending = dict(workers.logs)
    while pending:
        for name, path in list(pending.items()):
            process = workers.processes[name]
            if process.poll() is not None:
                raise RuntimeError(f"worker {name} exited ({process.returncode}); see {path}")
            if path.exists() and "ready." in path.read_text(errors="replace"):
                pending.pop(name)
        if time.monotonic() > deadline:
            raise TimeoutError(f"workers {sorted(pending)} not ready within {timeout} s")
        time.sleep(0.2)
