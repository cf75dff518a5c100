"""Running the baselines under the same measurement as the pipeline: same jobs (the same S3
inputs, the same emulator latency), same cores; CPU, memory, Redis commands and makespan."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.measure import CpuMeter, RssProbe, Sampler, command_calls, command_delta, percentile
from bench.pipeline import Inputs
from bench.stack import BUCKET, BenchStack
from lipsync.storage import parse_s3_uri
from producers.devstack import WorkerSpec

# The baselines' processes import `bench` from the repository, wherever the runner was started.
REPO = str(Path(__file__).resolve().parents[2])


def _summary(
    jobs: list[dict[str, Any]], *, started: float, latency: float, worker_cpu: float, extra: dict[str, Any]
) -> dict[str, Any]:
    done = [job for job in jobs if "completed" in job]
    errors: dict[str, int] = {}
    for job in jobs:
        if "error" in job:
            kind = job["error"].split(":")[0]
            errors[kind] = errors.get(kind, 0) + 1
    overheads = [job["completed"] - job["queued"] - latency for job in done]
    last = max((job["completed"] for job in done), default=time.time())
    n = max(1, len(jobs))
    return {
        "jobs": len(jobs),
        "completed": len(done),
        "errors": errors,
        "latency_s": latency,
        "makespan_s": last - started,
        "jobs_per_s": len(done) / max(1e-6, last - started),
        "overhead_p50_s": percentile(overheads, 50),
        "overhead_p95_s": percentile(overheads, 95),
        "overhead_p99_s": percentile(overheads, 99),
        "worker_cpu_s": worker_cpu,
        "worker_cpu_ms_per_job": 1000 * worker_cpu / n,
        **extra,
    }


def run_subscribe_pool(
    stack: BenchStack, *, jobs: int, width: int, latency: float, inputs: Inputs, timeout: float
) -> dict[str, Any]:
    """Baseline (a): the pool runs in its own process, whose CPU and memory are its cost."""
    stack.fresh(latency)
    spec_path = stack.workdir / "subscribe-pool-spec.json"
    out_path = stack.workdir / "subscribe-pool-out.json"
    out_path.unlink(missing_ok=True)
    assert stack.tls_emulator is not None
    spec = {
        "jobs": jobs,
        "width": width,
        "bucket": BUCKET,
        "video_key": parse_s3_uri(inputs.video_uri)[1],
        "audio_key": parse_s3_uri(inputs.audio_uri)[1],
        "cert": str(stack.tls_emulator.cert_path),
    }
    spec_path.write_text(json.dumps(spec))
    log = (stack.logdir / "subscribe-pool.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.baselines.subscribe_pool", str(spec_path), str(out_path)],
        env={**os.environ, **stack.env, **stack.tls_env(), "PYTHONPATH": REPO},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    # The pool reports its own CPU (getrusage, every thread); the services are measured here.
    meter = CpuMeter(stack.pids()).start()
    with Sampler({"pool": RssProbe(process.pid)}, interval=1.0) as sampler:
        deadline = time.monotonic() + timeout
        while process.poll() is None:
            if time.monotonic() > deadline:
                process.kill()
            time.sleep(0.5)
    cpu = meter.stop()
    if not out_path.exists():
        raise RuntimeError(f"the subscribe pool wrote no result; see {stack.logdir / 'subscribe-pool.log'}")
    result = json.loads(out_path.read_text())
    return _summary(
        result["jobs"],
        started=result["started"],
        latency=latency,
        worker_cpu=result["cpu_s"],
        extra={
            "width": width,
            "cpu_ms_per_job": {
                "pool": 1000 * result["cpu_s"] / max(1, jobs),
                **{k: 1000 * v / max(1, jobs) for k, v in cpu.items()},
            },
            "peak_worker_pss_mb": sampler.peak("pool.pss") / 2**20,
            "peak_worker_rss_mb": sampler.peak("pool.rss") / 2**20,
            "peak_at_fal": width,
            "redis_commands_per_job": 0.0,
            "status_polls_per_job": stack.tls_emulator.counters()["status_polls"] / max(1, jobs),
        },
    )


def run_blocking(
    stack: BenchStack, *, jobs: int, width: int, latency: float, inputs: Inputs, timeout: float
) -> dict[str, Any]:
    """Baseline (b): Celery threads blocked in poll loops, one per job in flight."""
    from bench.baselines import blocking

    stack.fresh(latency)
    assert stack.tls_emulator is not None
    workers = stack.start_celery(
        "bench.baselines.blocking",
        WorkerSpec(blocking.QUEUE, "threads", width, "blocking"),
        {**stack.tls_env(), "PYTHONPATH": REPO},
    )
    try:
        meter = CpuMeter({**workers.pids(), **stack.pids()}).start()
        commands_before = command_calls(stack.redis)
        own = 0
        video_key, audio_key = parse_s3_uri(inputs.video_uri)[1], parse_s3_uri(inputs.audio_uri)[1]
        with Sampler({"blocking": RssProbe(workers.pids()["blocking"])}, interval=1.0) as sampler:
            started = time.time()
            for index in range(jobs):
                blocking.app.send_task(
                    "bench.blocking_lipsync",
                    args=[index, time.time(), BUCKET, video_key, audio_key],
                    queue=blocking.QUEUE,
                )
            deadline = time.monotonic() + timeout
            while stack.redis.hlen(blocking.DONE_KEY) < jobs and time.monotonic() < deadline:
                own += 1
                time.sleep(0.5)
        cpu = meter.stop()
        commands = command_delta(commands_before, command_calls(stack.redis))
        records = [json.loads(raw) for raw in stack.redis.hvals(blocking.DONE_KEY)]
    finally:
        workers.stop()
    commands["hlen"] = max(0, commands.get("hlen", 0) - own - 1)
    commands.pop("info", None)
    commands.pop("hvals", None)
    n = max(1, jobs)
    return _summary(
        records,
        started=started,
        latency=latency,
        worker_cpu=cpu["blocking"],
        extra={
            "width": width,
            "cpu_ms_per_job": {k: 1000 * v / n for k, v in cpu.items()},
            "peak_worker_pss_mb": sampler.peak("blocking.pss") / 2**20,
            "peak_worker_rss_mb": sampler.peak("blocking.rss") / 2**20,
            "peak_at_fal": width,
            "redis_commands_per_job": sum(commands.values()) / n,
            "status_polls_per_job": stack.tls_emulator.counters()["status_polls"] / n,
        },
    )
