"""A fal webhook and a poll finishing the same job at the same moment, from separate OS processes.

Two tests. The first races the doors at the heart of it, deterministically; the second runs the
whole pipeline with both doors open at once.

`test_gateway.py` races threads of one process. Here the racers are real processes, as the gateway
and the api worker's poller are: each connects to the real redis-server on its own, and for every
job all of them are released together by a barrier kept in Redis (each says it has arrived, then
blocks on a list the test fills with one token per racer once all have arrived). Half of them come
in by the poll's door, half by the webhook's. Whatever the order Redis serves them in, exactly one
may record fal's output and hand the job to store: one "fal completed" event, one win, per job.

The second: a batch through a real `lipsync serve` gateway process (fal's webhooks, signed, into it)
and real workers whose poller checks every 0.1-0.3 s, so its checks land at fal's completion as the
webhooks do. Every job must be completed, and completed once: one "fal completed" event, one store,
one request created at fal per job (counted by the emulator). Which door wins each job is left to
the race and only reported: the webhook usually, being pushed; asserting that both won would
depend on timing, and the first test is the one that makes both doors race for every job.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from producers.devstack import DEFAULT_WORKERS, free_port, spawn_worker, stop_process
from tests.conftest import EMULATOR_LATENCY
from tests.integration.test_gateway import FalKeys, redis_db, start_gateway

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


# the whole pipeline, both doors open -----------------------------------------------------------------
PIPE_PREFIX = "race-pipe"
PIPE_JOBS = 16


@dataclass
class RaceStack:
    env: dict[str, str]
    client: Any  # a LipsyncClient on this stack's Redis database and prefix
    processes: list[subprocess.Popen[bytes]]


@pytest.fixture(scope="module")
def race_stack(
    stack_env: dict[str, str], redis_server: Any, emulator: Any, tmp_path_factory: Any
) -> Iterator[RaceStack]:
    from config.settings import Settings
    from producers.api import LipsyncClient

    logdir = tmp_path_factory.mktemp("race-logs")
    port = free_port()
    fal_keys = FalKeys(emulator.url)
    database = redis_db(redis_server.url, 13)  # its own broker and job store: the session's workers stay out
    env = {
        **stack_env,
        "LIPSYNC_REDIS_URL": database,
        "LIPSYNC_BROKER_URL": database,
        "LIPSYNC_KEY_PREFIX": PIPE_PREFIX,
        "LIPSYNC_FAL_WEBHOOK_URL": f"http://127.0.0.1:{port}/v1/fal/webhook",
        "LIPSYNC_FAL_JWKS_URL": fal_keys.url,
        # The poller checks as fast as it can, so its checks meet fal's completion and the webhook.
        "LIPSYNC_POLL_INITIAL_S": "0.1",
        "LIPSYNC_POLL_MAX_S": "0.3",
        "LIPSYNC_GATEWAY_RATE_LIMIT_PER_S": "0",
        "LIPSYNC_METRICS_PORT": "0",
    }
    processes = [start_gateway(env, port, logdir / "gateway.log")]
    try:
        for spec in DEFAULT_WORKERS:
            processes.append(spawn_worker(spec, env, log=(logdir / f"worker-{spec.name}.log").open("ab")))
        settings = Settings().model_copy(
            update={"redis_url": database, "broker_url": database, "key_prefix": PIPE_PREFIX}
        )
        client = LipsyncClient(settings)
        try:
            yield RaceStack(env, client, processes)
        finally:
            client.close()
    finally:
        for process in reversed(processes):
            stop_process(process, timeout=20)
        fal_keys.server.shutdown()


def test_a_batch_with_webhooks_and_an_eager_poller_completes_every_job_exactly_once(
    race_stack: RaceStack, emulator: Any, media: dict[str, str]
) -> None:
    from lipsync.models import JobStatus

    client = race_stack.client
    # fal takes 3 s a request here (the session's emulator: 0.3 s). This cold start's scouts are
    # due 0.1 s after their submit, but an idle poller sleeps up to 1 s between turns: with 0.3 s
    # every job could be finished by its webhook before the first check (CI saw 0 polls once).
    # With 3 s the first checks find the jobs running whatever the machine's load, and the checks
    # every 0.1-0.3 s after them meet fal's completion as the webhooks do.
    emulator.configure(media_mode="copy", latency="3.0")
    before = emulator.counters()
    try:
        submitted = [client.submit(media["video_3s"], media["audio_3s"]) for _ in range(PIPE_JOBS)]
        done = client.wait([job.id for job in submitted], timeout_s=300)
    finally:
        emulator.configure(media_mode="encode", latency=EMULATOR_LATENCY)
    assert {job.status for job in done} == {JobStatus.completed}, [job.error for job in done if job.error][:3]
    after = emulator.counters()
    # What fal received, counted by fal: one request per job, whatever header it carried.
    assert emulator.created_since(before) == PIPE_JOBS
    assert all(after["by_marker"].get(job.id) == 1 for job in done)
    # Both doors were open: fal sent a webhook for every request, and the poller checked.
    assert after["webhooks"] - before["webhooks"] == PIPE_JOBS
    assert after["status_polls"] > before["status_polls"]
    doors: dict[str, int] = {}
    for job in done:
        events = [e["event"] for e in client.store.events(job.id)]
        completions = [e for e in events if e.startswith("fal completed")]
        assert len(completions) == 1, (job.id, events)
        stores = [e for e in events if e.startswith("stored ")]
        assert len(stores) == 1, (job.id, events)
        door = completions[0].removeprefix("fal completed (by ").partition(")")[0]
        doors[door] = doors.get(door, 0) + 1
        assert client.storage.exists(f"outputs/{job.id}.mp4")
    # Every webhook fal sent was answered 2xx in the end (the losing door's too: it changes nothing).
    deadline = time.monotonic() + 30
    while emulator.counters()["webhooks_ended"] - before["webhooks_ended"] < PIPE_JOBS:
        assert time.monotonic() < deadline, "fal's webhooks were not all answered within 30 s"
        time.sleep(0.1)
    print(f"\nwinning doors over {PIPE_JOBS} jobs: {doors}")
