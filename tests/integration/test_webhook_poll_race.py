"""A fal webhook and a poll finishing the same job at the same moment, from separate OS processes.

`test_gateway.py` races threads of one process. Here the racers are real processes, as the gateway
and the api worker's poller are: each connects to the real redis-server on its own, and for every
job all of them are released together by a barrier kept in Redis (each says it has arrived, then
blocks on a list the test fills with one token per racer once all have arrived). Half of them come
in by the poll's door, half by the webhook's. Whatever the order Redis serves them in, exactly one
may record fal's output and hand the job to store: one "fal completed" event, one win, per job.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[2]
RACERS = 6  # processes, half by poll, half by webhook
JOBS = 5  # raced one after another by the same processes
PREFIX = "race-proc"
BARRIER_S = 60.0  # how long a racer waits to be released, and the test for the racers to arrive
OUTPUT = {"video": {"url": "http://127.0.0.1:9/out.mp4", "content_type": "video/mp4", "file_size": 1}}


def barrier_key(job_id: str, part: str) -> str:
    return f"{PREFIX}:barrier:{job_id}:{part}"


def racer(redis_url: str, via: str, job_ids: list[str]) -> None:
    """One racing process: for each job, arrive, wait to be released, try to finish it, say how it went."""
    from lipsync.jobs import finish_with_result
    from lipsync.observe import observed_store

    client = redis.Redis.from_url(redis_url)
    store = observed_store(client, PREFIX)
    for job_id in job_ids:
        request = store.get(job_id).fal
        assert request is not None
        client.incr(barrier_key(job_id, "arrived"))
        if client.blpop([barrier_key(job_id, "go")], timeout=int(BARRIER_S)) is None:
            raise SystemExit(f"racer {os.getpid()} was never released for job {job_id}")
        won = finish_with_result(store, job_id, request, OUTPUT, via=via, transfer_lease_s=300)
        client.rpush(barrier_key(job_id, "results"), f"{via} {os.getpid()} {'won' if won else 'lost'}")
    client.close()


def wait_until(check: Any, what: str, processes: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + BARRIER_S
    while not check():
        dead = [p.args for p in processes if p.poll() not in (None, 0)]
        assert not dead, f"a racer died: {dead}"
        assert time.monotonic() < deadline, f"{what}: not within {BARRIER_S:.0f} s"
        time.sleep(0.05)


def test_poll_and_webhook_processes_released_together_finish_each_job_exactly_once(redis_server: Any) -> None:
    from lipsync.models import FalRequest, Job, JobStatus, LipsyncInput
    from lipsync.observe import observed_store

    client = redis.Redis.from_url(redis_server.url)
    # Its own prefix: no dispatcher or worker looks at these jobs, only the racers.
    store = observed_store(client, PREFIX)
    now = time.time()
    job_ids = []
    for n in range(JOBS):
        fal = FalRequest(
            request_id=f"req-race-{n}", status_url="http://x/s", response_url="http://x/r", cancel_url="http://x/c"
        )
        job = Job(
            id=store.new_id(), status=JobStatus.queued, request=LipsyncInput(video_url="s3://b/v", audio_url="s3://b/a"),
            request_digest="d", created_at=now, updated_at=now, deadline_at=now + 600,
        )  # fmt: skip
        store.create(job, dispatch_lease_s=3600)
        fields = {"fal": fal.model_dump(mode="json")}
        store.advance(job.id, JobStatus.in_progress, from_=[JobStatus.queued], fields=fields)
        job_ids.append(job.id)
    doors = ["poll" if n % 2 else "webhook" for n in range(RACERS)]
    code = f"from {__name__} import racer; racer({redis_server.url!r}, {{via!r}}, {job_ids!r})"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code.format(via=via)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for via in doors
    ]
    wins: dict[str, str] = {}
    try:
        for job_id in job_ids:
            arrived = barrier_key(job_id, "arrived")
            wait_until(lambda k=arrived: int(client.get(k) or 0) == RACERS, f"all racers at job {job_id}", processes)
            client.rpush(barrier_key(job_id, "go"), *["go"] * RACERS)  # one push releases every racer
            results = barrier_key(job_id, "results")
            wait_until(lambda k=results: client.llen(k) == RACERS, f"every racer done with job {job_id}", processes)
            outcomes = [entry.decode().split() for entry in client.lrange(results, 0, -1)]
            winners = [via for via, _, outcome in outcomes if outcome == "won"]
            assert len(winners) == 1, (job_id, outcomes)
            assert len({pid for _, pid, _ in outcomes}) == RACERS, outcomes  # each process raced once
            wins[job_id] = winners[0]
        for process in processes:
            assert process.wait(timeout=BARRIER_S) == 0, process.args
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for job_id, door in wins.items():
        job = store.get(job_id)
        assert job.status is JobStatus.storing, job.status
        assert job.fal is not None and job.fal.output is not None
        completions = [e["event"] for e in store.events(job_id) if e["event"].startswith("fal completed")]
        assert completions == [f"fal completed (by {door}); storing the output"], completions
    print(f"\nwinning doors over {JOBS} jobs, {RACERS} processes each: {sorted(wins.values())}")
    client.close()
