"""What fal received, counted by fal: requests created per test, whatever header they carried.

Each test reads the emulator's counters before and after itself (never session totals) and,
where it can, looks at its own fal request (`inspect(request_id)`).
"""

from __future__ import annotations

import contextlib
import time
import urllib.parse
from typing import Any

import httpx

from lipsync.errors import InvalidTransition
from lipsync.models import JobStatus


def test_submit_answered_5xx_after_fal_created_the_request_is_not_posted_again(
    client: Any, media: dict[str, str], emulator: Any, workers: Any
) -> None:
    """Real fal can create the request and still answer 5xx (its id in `x-fal-request-id`)."""
    before = emulator.counters()
    emulator.set_faults(runner_5xx_created="once")
    try:
        job = client.submit(media["video_3s"], media["audio_3s"])
        (job,) = client.wait([job.id], timeout_s=120)
    finally:
        emulator.clear_faults()
    assert emulator.counters()["faults_injected"].get("runner_5xx_created", 0) > before["faults_injected"].get(
        "runner_5xx_created", 0
    ), "the fault never fired: the test proves nothing"
    assert job.terminal, job.status
    assert emulator.created_since(before) == 1, "a submit fal had created was POSTed again: paid twice"


def test_output_gone_from_fals_cdn_fails_the_job_as_output_unavailable_and_stores_nothing(
    client: Any, media: dict[str, str], emulator: Any, workers: Any
) -> None:
    before = emulator.counters()
    emulator.set_faults(cdn_404="once")
    try:
        job = client.submit(media["video_3s"], media["audio_3s"])
        (job,) = client.wait([job.id], timeout_s=120)
    finally:
        emulator.clear_faults()
    assert job.status is JobStatus.failed, job.status
    assert job.error is not None and job.error.code == "output_unavailable", job.error
    assert "Traceback" not in job.error.message
    assert job.fal is not None and "cdn_404" in emulator.inspect(job.fal.request_id)["inject"]
    assert emulator.created_since(before) == 1
    assert job.output is None
    assert not client.storage.exists(f"outputs/{job.id}.mp4")


def test_presigned_output_url_lives_as_long_as_configured_and_serves_the_stored_bytes(
    client: Any, media: dict[str, str], workers: Any
) -> None:
    job = client.submit(media["video_3s"], media["audio_3s"])
    (job,) = client.wait([job.id], timeout_s=120)
    assert job.status is JobStatus.completed, job.error
    minted_at = time.time()
    url = client.get(job.id).output.presigned_url
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    # SigV4 (X-Amz-Expires, seconds) or SigV2 (Expires, an epoch time): either way, the setting.
    sigv4 = "X-Amz-Expires" in query
    lifetime = int(query["X-Amz-Expires"][0]) if sigv4 else int(query["Expires"][0]) - int(minted_at)
    assert abs(lifetime - client.settings.presign_ttl_s) <= 2, (lifetime, client.settings.presign_ttl_s)
    answer = httpx.get(url, timeout=30)
    assert answer.status_code == 200
    assert len(answer.content) == job.output.file_size


def wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.1)


def test_cancel_while_the_submit_is_in_flight_cancels_the_request_fal_then_creates(
    client: Any, media: dict[str, str], emulator: Any, workers: Any
) -> None:
    """The POST hangs at fal (3 s); the job is cancelled meanwhile; fal's request must not run on our bill."""
    emulator.configure(hang_seconds=3)
    before = emulator.counters()
    hangs_before = before["faults_injected"].get("hang", 0)
    emulator.set_faults(hang="once")
    try:
        job = client.submit(media["video_3s"], media["audio_3s"])
        # The POST is in flight once fal has started to hang on it.
        wait_until(lambda: emulator.counters()["faults_injected"].get("hang", 0) > hangs_before, 60, "submit sent")
        assert client.get(job.id).status is JobStatus.submitting
        cancelled = client.cancel(job.id)
        assert cancelled.status is JobStatus.cancelled
        wait_until(lambda: emulator.created_since(before) == 1, 30, "fal created the request")
        (request,) = [r for r in emulator.requests() if r["marker"] == job.id]
        wait_until(lambda: emulator.inspect(request["id"])["cancel_requested"], 30, "request cancelled at fal")
    finally:
        emulator.clear_faults()
        emulator.configure(hang_seconds=60)
    assert client.get(job.id).status is JobStatus.cancelled
    assert emulator.created_since(before) == 1


def test_deadline_passing_while_queued_at_fal_fails_the_job_and_cancels_its_request(
    client: Any, media: dict[str, str], emulator: Any, workers: Any
) -> None:
    """fal runs one request at a time and a long one holds it: the next waits in fal's queue past its deadline."""
    from producers.api import LipsyncClient

    emulator.configure(concurrency=1, latency="60")
    before = emulator.counters()
    short = LipsyncClient(client.settings.model_copy(update={"job_deadline_s": 15}))
    blocker = client.submit(media["video_3s"], media["audio_3s"])
    try:
        wait_until(lambda: client.get(blocker.id).fal is not None, 60, "the blocker reached fal")
        job = short.submit(media["video_3s"], media["audio_3s"])
        (job,) = short.wait([job.id], timeout_s=90)
        assert job.status is JobStatus.failed and job.error is not None, job.status
        assert job.error.code == "deadline_exceeded", job.error
        assert job.fal is not None, "it reached fal before its deadline"
        # Never ran, so nothing to pay: either fal dropped it itself when the X-Fal-Request-Timeout
        # we sent (the time left to the deadline) ran out, or we cancelled it. The job fails first,
        # then the cancel lands: wait for the request to end.
        unstarted_ends = ("request_timeout", "request_cancelled")
        wait_until(
            lambda: emulator.inspect(job.fal.request_id)["error_type"] in unstarted_ends, 30, "request ended at fal"
        )
        request = emulator.inspect(job.fal.request_id)
        assert request["started"] is None, request["status"]
    finally:
        # The blocker may have ended already (a broken deadline lets it run out): the assertion above
        # must stay what the test reports, not this cleanup's "nothing to cancel".
        with contextlib.suppress(InvalidTransition):
            client.cancel(blocker.id)
        emulator.configure(concurrency=8, latency="0.3")
        short.close()
    assert emulator.created_since(before) == 2


def test_request_id_is_saved_through_a_redis_outage_that_starts_while_the_submit_is_in_flight(
    stack_env: dict[str, str], redis_server: Any, media: dict[str, str], emulator: Any, tmp_path: Any
) -> None:
    """Made to happen, not hoped for: Redis goes away while fal holds the POST, and is back only after
    the worker has the request id in hand and has tried to save it. The job must complete on that
    one request: neither lost (a paid request no job knows) nor submitted again."""
    import urllib.parse

    from producers.api import LipsyncClient
    from producers.devstack import DEFAULT_WORKERS, free_port
    from tests.chaos.proxy import TcpProxy
    from tests.conftest import Workers
    from tests.fixtures.isolated import settings_from

    parts = urllib.parse.urlsplit(redis_server.url)
    proxy = TcpProxy(parts.port or 6379, free_port())
    proxy.start()
    # The workers' job store goes through the proxy; their broker and this test's view go direct.
    direct = urllib.parse.urlunsplit(parts._replace(path="/11"))
    proxied = urllib.parse.urlunsplit(parts._replace(netloc=f"127.0.0.1:{proxy.port}", path="/11"))
    env = {**stack_env, "LIPSYNC_REDIS_URL": proxied, "LIPSYNC_BROKER_URL": direct, "LIPSYNC_KEY_PREFIX": "blip"}
    workers = Workers(env, tmp_path)
    for spec in DEFAULT_WORKERS:
        workers.start(spec)
    client = LipsyncClient(settings_from({**env, "LIPSYNC_REDIS_URL": direct}))
    emulator.configure(hang_seconds=3)
    before = emulator.counters()
    hangs_before = before["faults_injected"].get("hang", 0)
    try:
        wait_until(lambda: workers.logs().count(" ready.") >= len(DEFAULT_WORKERS), 60, "workers ready")
        emulator.set_faults(hang="once")
        job = client.submit(media["video_3s"], media["audio_3s"])
        wait_until(lambda: emulator.counters()["faults_injected"].get("hang", 0) > hangs_before, 60, "submit sent")
        proxy.stop()  # Redis unreachable for the workers from here on
        wait_until(lambda: emulator.created_since(before) == 1, 30, "fal created the request")
        (request,) = [r for r in emulator.requests() if r["marker"] == job.id]
        # The worker has fal's answer and is trying to save it: it says so, naming the request.
        wait_until(lambda: request["id"] in workers.logs(), 30, "the worker tried to save the request id")
        assert client.get(job.id).fal is None, "saved while Redis was unreachable?"
        proxy.start()
        (job,) = client.wait([job.id], timeout_s=120)
        events = [entry["event"] for entry in client.store.events(job.id)]
    finally:
        emulator.clear_faults()
        emulator.configure(hang_seconds=60)
        workers.stop_all()
        proxy.stop()
        client.redis.flushdb()
        client.close()
    assert job.status is JobStatus.completed, job.error
    assert job.fal is not None and job.fal.request_id == request["id"]
    assert emulator.created_since(before) == 1
    # Saved by the submit that made it, through the outage: not found again later by reconciliation
    # (which, against fal's own listing, may have to wait out the start timeout).
    assert f"submitted to fal as {request['id']}" in events, events


def test_worker_killed_during_submit_pays_once_and_completes(
    stack_env: dict[str, str], redis_server: Any, media: dict[str, str], emulator: Any, tmp_path: Any
) -> None:
    """kill -9 the api worker while fal holds its POST: the rerun reconciles instead of POSTing blind."""
    import urllib.parse

    from producers.api import LipsyncClient
    from producers.devstack import DEFAULT_WORKERS
    from tests.conftest import Workers
    from tests.fixtures.isolated import kill_group, settings_from

    own = urllib.parse.urlunsplit(urllib.parse.urlsplit(redis_server.url)._replace(path="/12"))
    env = {**stack_env, "LIPSYNC_REDIS_URL": own, "LIPSYNC_BROKER_URL": own, "LIPSYNC_KEY_PREFIX": "killed"}
    workers = Workers(env, tmp_path)
    for spec in DEFAULT_WORKERS:
        workers.start(spec)
    client = LipsyncClient(settings_from(env))
    emulator.configure(hang_seconds=5)
    before = emulator.counters()
    hangs_before = before["faults_injected"].get("hang", 0)
    try:
        wait_until(lambda: workers.logs().count(" ready.") >= len(DEFAULT_WORKERS), 60, "workers ready")
        emulator.set_faults(hang="once")
        job = client.submit(media["video_3s"], media["audio_3s"])
        wait_until(lambda: emulator.counters()["faults_injected"].get("hang", 0) > hangs_before, 60, "submit sent")
        kill_group(workers.processes["api"])  # mid-POST: its answer can never arrive
        api = next(spec for spec in DEFAULT_WORKERS if spec.name == "api")
        workers.start(api)
        (job,) = client.wait([job.id], timeout_s=120)
    finally:
        emulator.clear_faults()
        emulator.configure(hang_seconds=60)
        workers.stop_all()
        client.redis.flushdb()
        client.close()
    # The interrupted POST's request is found in fal's listing and adopted, or, if fal never made
    # it, fal confirms none exists and the job is submitted once: completed, one request either way.
    assert job.status is JobStatus.completed, job.error
    assert emulator.created_since(before) == 1
