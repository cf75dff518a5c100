"""One run of the pipeline under measurement: fresh Redis and workers, N jobs submitted by the
producer API, waited for, and every figure taken from the same run."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.measure import CpuMeter, CpuRateProbe, RssProbe, Sampler, command_calls, command_delta, percentile
from bench.stack import BenchStack, Workers
from lipsync.models import Job, JobStatus, LipsyncInput
from lipsync.storage import Storage
from producers.devstack import metrics_port

TERMINAL = ("completed", "failed", "cancelled")
AT_FAL = ("submitted", "in_queue", "in_progress")
# Where a job's time goes, from its timestamps (ts:<status> is when it entered the status).
_PHASES = (
    ("waiting_for_stage", "queued", "staging"),
    ("stage", "staging", "submitting"),
    ("submit", "submitting", "submitted"),
    ("at_fal_beyond_L", "submitted", "storing"),
    ("store", "storing", "completed"),
)
# Commands the bench itself sends per progress sample (SCARD per status, pipelined).
_PROGRESS_COMMANDS = len(JobStatus)


@dataclass
class Inputs:
    video_uri: str
    audio_uri: str
    video_bytes: int
    audio_bytes: int


def upload_inputs(storage: Storage, video: Path, audio: Path, prefix: str = "bench-inputs") -> Inputs:
    """Put the inputs in S3 once: jobs then carry s3:// URIs, as a media platform's would."""
    keys = []
    for path, content_type in ((video, "video/mp4"), (audio, "audio/wav")):
        key = f"{prefix}/{path.name}"
        storage.upload_file(str(path), key, content_type=content_type)
        keys.append(storage.uri(key))
    return Inputs(keys[0], keys[1], video.stat().st_size, audio.stat().st_size)


def counts(stack: BenchStack, prefix: str = "lipsync") -> dict[str, int]:
    pipe = stack.redis.pipeline(transaction=False)
    for status in JobStatus:
        pipe.scard(f"{prefix}:status:{status.value}")
    return {status.value: int(n) for status, n in zip(JobStatus, pipe.execute(), strict=True)}


def run_jobs(
    stack: BenchStack,
    *,
    jobs: int,
    latency: float,
    inputs: Inputs,
    timeout: float,
    env: Mapping[str, str] | None = None,
    on_workers: Callable[[Workers], Any] | None = None,
    sample_interval: float = 1.0,
    hold_s: float | None = None,
    webhooks: bool = False,
) -> dict[str, Any]:
    """Run `jobs` jobs through fresh workers; returns the run's record (raw figures, no stats).

    With `hold_s`, fal holds every request in its queue (the emulator runs one at a time) until
    all jobs wait there, keeps them waiting `hold_s` seconds more (the workers' CPU and memory
    are measured over that plateau), then runs them all at once with latency L."""
    from config.settings import Settings
    from producers.api import LipsyncClient

    stack.fresh(latency)
    gateway = None
    if webhooks:  # fal's webhooks through the gateway; its CPU counts as the pipeline's
        gateway, webhook_env = stack.start_gateway()
        env = {**(env or {}), **webhook_env}
    workers = stack.start_workers(env=env)
    if gateway is not None:
        workers.processes.update(gateway.processes)
        workers.logs.update(gateway.logs)
    client = LipsyncClient(Settings())
    emulator = stack.emulator
    assert emulator is not None
    attachment = on_workers(workers) if on_workers is not None else None
    try:
        worker_pids = workers.pids()
        meter = CpuMeter({**worker_pids, **stack.pids()}).start()
        commands_before = command_calls(stack.redis)
        progress_samples = 0

        def at_fal() -> dict[str, float]:
            found = emulator.counters()
            return {"in_queue": found["in_queue"], "in_progress": found["in_progress"]}

        probes: dict[str, Any] = {"fal": at_fal}
        for name, pid in worker_pids.items():
            probes[f"{name}_rss"] = RssProbe(pid)
            probes[f"{name}_cpu"] = CpuRateProbe(pid)
        with Sampler(probes, interval=sample_interval) as sampler:
            request = LipsyncInput(video_url=inputs.video_uri, audio_url=inputs.audio_uri)
            if hold_s is not None:
                emulator.configure(concurrency=1)
            started = time.time()
            ids = [client.submit_request(request).id for _ in range(jobs)]
            submitted = time.time()
            deadline = time.monotonic() + timeout
            if hold_s is not None:
                plateau = hold(stack, jobs, hold_s, worker_pids, deadline, started)
                progress_samples += plateau.pop("progress_samples")
                emulator.configure(concurrency=100000)
            while True:
                found = counts(stack)
                progress_samples += 1
                if sum(found[s] for s in TERMINAL) >= jobs or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            finished = time.time()
        cpu = meter.stop()
        commands = command_delta(commands_before, command_calls(stack.redis))
        media_cpu = media_cpu_s(workers)
    finally:
        if attachment is not None and hasattr(attachment, "close"):
            attachment.close()
        workers.stop()
    # The bench's own progress polling and INFO calls are not the pipeline's.
    own = progress_samples * _PROGRESS_COMMANDS
    commands["scard"] = max(0, commands.get("scard", 0) - own)
    commands.pop("info", None)
    commands.pop("flushall", None)
    records = []
    for start in range(0, len(ids), 500):
        records.extend(client.store.get_many(ids[start : start + 500]))
    by_webhook = 0
    if webhooks:  # which of poll and webhook saw each completion first
        for job_id in ids:
            by_webhook += any("(by webhook)" in e.get("event", "") for e in client.store.events(job_id))
    client.close()
    return summarise_run(
        records,
        latency=latency,
        started=started,
        submitted=submitted,
        finished=finished,
        cpu=cpu,
        media_cpu=media_cpu,
        commands=commands,
        sampler=sampler,
        worker_names=list(worker_pids),
        extra={
            "profile": attachment.result() if attachment is not None and hasattr(attachment, "result") else None,
            **({"plateau": plateau} if hold_s is not None else {}),
            **({"completed_by_webhook": by_webhook} if webhooks else {}),
        },
    )


def media_cpu_s(workers: Workers) -> float | None:
    """CPU seconds the workers spent moving and probing media bytes, from their own
    `lipsync_media_cpu_seconds` (each thread's clock around a download, an upload, a probe);
    None if a worker does not answer on /metrics."""
    total = 0.0
    for process in workers.processes.values():
        port = metrics_port(process)
        if not port:
            continue  # the gateway: it moves no media
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        except httpx.HTTPError:
            return None
        for family in text_string_to_metric_families(text):
            if family.name == "lipsync_media_cpu_seconds":
                total += sum(sample.value for sample in family.samples if sample.name.endswith("_total"))
    return total


def hold(
    stack: BenchStack, jobs: int, hold_s: float, worker_pids: Mapping[str, int], deadline: float, started: float
) -> dict[str, Any]:
    """Wait until every job waits at fal, then measure the workers over `hold_s` of pure waiting."""
    samples = 0
    while time.monotonic() < deadline:
        found = counts(stack)
        samples += 1
        if sum(found[s] for s in AT_FAL) + sum(found[s] for s in TERMINAL) >= jobs:
            break
        time.sleep(0.5)
    all_waiting = time.time() - started
    waiting = sum(counts(stack)[s] for s in AT_FAL)
    meter = CpuMeter(worker_pids).start()
    memory = {name: RssProbe(pid) for name, pid in worker_pids.items()}
    peak: dict[str, float] = {}
    polls_before = stack.emulator.counters()["status_polls"] if stack.emulator else 0
    end = time.monotonic() + hold_s
    while time.monotonic() < end:
        for name, probe in memory.items():
            for kind, value in probe().items():
                peak[f"{name}_{kind}"] = max(peak.get(f"{name}_{kind}", 0.0), value)
        time.sleep(1.0)
    cpu = meter.stop()
    polls = (stack.emulator.counters()["status_polls"] if stack.emulator else 0) - polls_before
    return {
        "waiting_at_fal": waiting,
        "all_waiting_after_s": all_waiting,
        "hold_s": hold_s,
        "cpu_cores": {name: seconds / hold_s for name, seconds in cpu.items()},
        "status_polls_per_s": polls / hold_s,
        "pss_mb": sum(v for k, v in peak.items() if k.endswith("_pss")) / 2**20,
        "rss_mb": sum(v for k, v in peak.items() if k.endswith("_rss")) / 2**20,
        "progress_samples": samples + 1,
    }


def summarise_run(
    records: list[Job],
    *,
    latency: float,
    started: float,
    submitted: float,
    finished: float,
    cpu: Mapping[str, float],
    commands: Mapping[str, int],
    sampler: Sampler,
    media_cpu: float | None = None,
    worker_names: list[str],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    completed = [job for job in records if job.status is JobStatus.completed]
    latencies = [job.timestamps["completed"] - job.timestamps["queued"] for job in completed]
    overheads = [value - latency for value in latencies]
    last_done = max((job.timestamps["completed"] for job in completed), default=finished)
    n = max(1, len(records))
    worker_cpu = sum(cpu[name] for name in worker_names)
    polls = [job.attempts.get("poll", 0) for job in completed]
    errors: dict[str, int] = {}
    for job in records:
        if job.error is not None:
            errors[job.error.code] = errors.get(job.error.code, 0) + 1
    at_fal = [
        (at, values.get("fal.in_queue", 0) + values.get("fal.in_progress", 0))
        for at, values in ((s.at, s.values) for s in sampler.samples)
        if "fal.in_queue" in values
    ]
    series: dict[str, list[tuple[float, float]]] = {"at_fal": [(at - started, v) for at, v in at_fal]}
    for name in worker_names:
        series[f"{name}_pss_mb"] = [(at - started, v / 2**20) for at, v in sampler.series(f"{name}_rss.pss")]
        series[f"{name}_cpu"] = [(at - started, v) for at, v in sampler.series(f"{name}_cpu.cpu")]

    def peak_sum(kind: str) -> float:
        return max(
            (sum(s.values.get(f"{name}_rss.{kind}", 0.0) for name in worker_names) for s in sampler.samples),
            default=0.0,
        )

    stage_times = [
        j.timestamps["submitting"] - j.timestamps["staging"] for j in completed if "submitting" in j.timestamps
    ]
    store_times = [j.timestamps["completed"] - j.timestamps["storing"] for j in completed if "storing" in j.timestamps]
    staged = [j.timestamps["submitting"] for j in completed if "submitting" in j.timestamps]
    phases: dict[str, list[float]] = {}
    for job in completed:
        ts = job.timestamps
        for name, start, end in _PHASES:
            if start in ts and end in ts:
                value = ts[end] - ts[start] - (latency if name == "at_fal_beyond_L" else 0.0)
                phases.setdefault(name, []).append(value)
    sizes = sorted(j.output.file_size or 0 for j in completed if j.output is not None)
    return {
        "jobs": len(records),
        "completed": len(completed),
        "errors": errors,
        "latency_s": latency,
        "submit_s": submitted - started,
        "makespan_s": last_done - started,
        "jobs_per_s": len(completed) / max(1e-6, last_done - started),
        "overhead_p50_s": percentile(overheads, 50),
        "overhead_p95_s": percentile(overheads, 95),
        "overhead_p99_s": percentile(overheads, 99),
        "stage_p50_s": percentile(stage_times, 50),
        "stage_span_s": max(staged, default=started) - started,
        "first_completion_s": min((j.timestamps["completed"] for j in completed), default=started) - started,
        "output_bytes": sizes[len(sizes) // 2] if sizes else 0,
        "store_p50_s": percentile(store_times, 50),
        "polls_per_job": sum(polls) / max(1, len(polls)),
        "phases_s": {
            name: {"p50": percentile(values, 50), "p95": percentile(values, 95)} for name, values in phases.items()
        },
        "worker_cpu_s": worker_cpu,
        "worker_cpu_ms_per_job": 1000 * worker_cpu / n,
        "cpu_ms_per_job": {name: 1000 * seconds / n for name, seconds in cpu.items()},
        # Moving and probing bytes, and everything else (Celery, Redis, fal's API, the poller).
        **(
            {
                "media_cpu_ms_per_job": 1000 * media_cpu / n,
                "orchestration_cpu_ms_per_job": 1000 * (worker_cpu - media_cpu) / n,
            }
            if media_cpu is not None
            else {}
        ),
        "redis_commands_per_job": sum(commands.values()) / n,
        "redis_scripts_per_job": commands.get("evalsha", 0) / n,
        "redis_commands_top": {k: round(v / n, 2) for k, v in sorted(commands.items(), key=lambda kv: -kv[1])[:14]},
        "peak_at_fal": max((v for _, v in at_fal), default=0.0),
        "peak_worker_pss_mb": peak_sum("pss") / 2**20,
        "peak_worker_rss_mb": peak_sum("rss") / 2**20,
        "series": series,
        **(extra or {}),
    }
