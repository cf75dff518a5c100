"""A real fal account at volume (issue 12): a locked account pauses, deadlines protect money, a lost
submit answer is reconciled, never paid twice. Its own Redis, emulator and `celery worker`s (their
settings differ from the session's), the session's S3 server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from lipsync.models import Job, JobStatus
from producers.devstack import start_redis
from producers.stats import compute_stats
from tests.conftest import Workers
from tests.fixtures.emulator import EmulatorProcess, start_emulator
from tests.fixtures.isolated import aws_env, settings_from

FAL_KEY = "account-test-key-5d1e"
PROBE_S = 1.0
PROBE_MAX_S = 2.0
START_TIMEOUT_S = 4.0
LATENCY_S = 1.5


@dataclass
class AccountStack:
    env: dict[str, str]
    emulator: EmulatorProcess
    workers: Workers
    client: Any

    def submit(
        self, media: dict[str, str], count: int, *, how: dict[str, Any] | None = None, **settings: Any
    ) -> list[Job]:
        client = self.client
        if settings:
            from producers.api import LipsyncClient

            client = LipsyncClient(settings_from({**self.env, **settings}))
        try:
            return [client.submit(media["video_3s"], media["audio_3s"], **(how or {})) for _ in range(count)]
        finally:
            if settings:
                client.close()

    def jobs(self, jobs: list[Job]) -> list[Job]:
        return [self.client.store.get(job.id) for job in jobs]

    def wait_ended(self, jobs: list[Job], timeout: float = 150) -> list[Job]:
        def ended() -> list[Job] | None:
            now = self.jobs(jobs)
            return now if all(j.terminal for j in now) else None

        return wait_for(ended, timeout, "jobs end")  # type: ignore[no-any-return]


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def stack(s3_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AccountStack]:
    from producers.api import LipsyncClient

    logdir: Path = tmp_path_factory.mktemp("account-logs")
    emulator = start_emulator(
        "--latency", str(LATENCY_S), "--concurrency", "2", log=(logdir / "emulator.log").open("ab")
    )  # fmt: skip
    with start_redis() as redis_server:
        env = {
            **s3_server.env(),
            "LIPSYNC_S3_BUCKET": "lipsync-account",
            "LIPSYNC_KEY_PREFIX": f"account{uuid.uuid4().hex[:6]}",
            "LIPSYNC_REDIS_URL": redis_server.url,
            "LIPSYNC_BROKER_URL": redis_server.url,
            "LIPSYNC_FAL_QUEUE_URL": emulator.url,
            "FAL_KEY": FAL_KEY,
            "LIPSYNC_ALLOW_PRIVATE_URLS": "127.0.0.1,localhost",
            "LIPSYNC_POLL_INITIAL_S": "0.3",
            "LIPSYNC_POLL_MAX_S": "1",
            "LIPSYNC_RETRY_BASE_S": "0.3",
            "LIPSYNC_RETRY_MAX_S": "3",
            "LIPSYNC_POLL_LEASE_S": "15",
            "LIPSYNC_TRANSFER_LEASE_S": "30",
            "LIPSYNC_DISPATCH_INTERVAL_S": "0.1",
            "LIPSYNC_SUBMITS_PER_SECOND": "200",
            "LIPSYNC_FAL_ACCOUNT_PROBE_S": str(PROBE_S),
            "LIPSYNC_FAL_ACCOUNT_PROBE_MAX_S": str(PROBE_MAX_S),
            "LIPSYNC_FAL_CONCURRENCY_HINT": "2",
            "LIPSYNC_FAL_QUEUE_BUFFER": "1",
            "LIPSYNC_FAL_START_TIMEOUT_S": str(START_TIMEOUT_S),
            "LIPSYNC_FAL_LISTING_GRACE_S": "1",
            # As with fal's own listing: "not listed" proves nothing until the start timeout passed.
            "LIPSYNC_FAL_LISTING_LISTS_UNFINISHED": "false",
        }
        settings = settings_from(env)
        with aws_env(env):
            client = LipsyncClient(settings)
            client.storage.ensure_bucket()
            workers = Workers(env, logdir)
            workers.start_all()
            try:
                yield AccountStack(env, emulator, workers, client)
            finally:
                workers.stop_all()
                client.close()
                emulator.stop()


def requests_per_job(stack: AccountStack, jobs: list[Job]) -> dict[str, int]:
    by_marker: dict[str, int] = stack.emulator.counters()["by_marker"]
    return {job.id: by_marker.get(job.id, 0) for job in jobs}


def test_locked_account_mid_batch_pauses_submits_and_fails_no_job(stack: AccountStack, media: dict[str, str]) -> None:
    refusals_before = stack.emulator.counters()["locked_refusals"]
    jobs = stack.submit(media, 8)
    # Lock once fal has the first requests: the rest meet the lock.
    wait_for(lambda: any(j.fal is not None for j in stack.jobs(jobs)), 60, "a first submit")
    lock_s = 6.0
    stack.emulator.lock(lock_s)
    locked_at = time.monotonic()
    # While locked, waiting jobs say what they wait on (and none has failed).
    waiting = wait_for(
        lambda: [j for j in stack.jobs(jobs) if j.waiting_on and "fal account" in j.waiting_on], lock_s, "waiting_on"
    )
    assert waiting and all(j.status is JobStatus.submitting for j in waiting)
    paused = compute_stats(stack.client.store, 5).waiting_on  # what `lipsync stats` shows
    assert paused is not None and "fal account" in paused and "locked" in paused.lower()
    assert time.monotonic() - locked_at < lock_s
    created_in_lock = stack.emulator.account(FAL_KEY)["created"]
    time.sleep(max(0.0, locked_at + lock_s - time.monotonic()))  # the lock ends (a top-up)
    wait_for(lambda: stack.emulator.account(FAL_KEY)["created"] > created_in_lock, PROBE_MAX_S + 3, "work resumes")
    ended = stack.wait_ended(jobs)
    assert [j.status for j in ended] == [JobStatus.completed] * len(jobs), [j.error for j in ended]
    assert set(requests_per_job(stack, jobs).values()) == {1}
    refusals = stack.emulator.counters()["locked_refusals"] - refusals_before
    # One probe per interval (PROBE_S at first), plus the submits already on their way when it locked
    # (at most the admission cap: concurrency hint 2 + buffer 1).
    assert 1 <= refusals <= lock_s / PROBE_S + 3, refusals
    assert all(j.waiting_on is None for j in ended)
    assert compute_stats(stack.client.store, 5).waiting_on is None
    assert all(j.attempts.get("submit", 0) == 1 for j in ended), [j.attempts for j in ended]


def test_deadline_passing_while_in_progress_does_not_cancel_the_paid_request(
    stack: AccountStack, media: dict[str, str]
) -> None:
    stack.emulator.configure(latency="8")
    try:
        started_before = stack.emulator.account(FAL_KEY).get("started", 0)
        [job] = stack.submit(media, 1, LIPSYNC_JOB_DEADLINE_S="6")
        seen = wait_for(
            lambda: (j := stack.jobs([job])[0]).status in (JobStatus.in_progress, JobStatus.failed) and j, 30, "start"
        )
        assert seen.status is JobStatus.in_progress, seen.error
        [ended] = stack.wait_ended([job], timeout=60)
    finally:
        stack.emulator.configure(latency=str(LATENCY_S))
    assert ended.status is JobStatus.completed, ended.error
    assert ended.timestamps["completed"] > ended.deadline_at  # it ran past its deadline, to the end
    assert stack.emulator.account(FAL_KEY)["started"] - started_before == 1


def test_lost_submit_answer_is_reconciled_without_a_second_request(stack: AccountStack, media: dict[str, str]) -> None:
    stack.emulator.set_faults(drop_submit="once")
    try:
        [job] = stack.submit(media, 1)
        [ended] = stack.wait_ended([job], timeout=90)
    finally:
        stack.emulator.clear_faults()
    assert ended.status is JobStatus.completed, ended.error
    assert requests_per_job(stack, [job]) == {job.id: 1}
    events = " ".join(str(e.get("event", "")) for e in stack.client.store.events(job.id))
    assert "reconciled: fal's listing shows request" in events


def test_5xx_with_request_id_on_submit_is_reconciled_not_re_posted(stack: AccountStack, media: dict[str, str]) -> None:
    submits_before = stack.emulator.counters()["submits"]
    stack.emulator.set_faults(runner_5xx="once")
    try:
        [job] = stack.submit(media, 1)
        [ended] = stack.wait_ended([job], timeout=90)
    finally:
        stack.emulator.clear_faults()
    assert ended.status is JobStatus.completed, ended.error
    assert requests_per_job(stack, [job]) == {job.id: 1}
    events = " ".join(str(e.get("event", "")) for e in stack.client.store.events(job.id))
    # Sent again only once fal confirmed that the first POST made no request: after its start timeout.
    assert "fal confirms the lost submit made no request" in events
    assert stack.emulator.counters()["submits"] - submits_before == 2
    first, second = ended.timestamps["submitting"], ended.timestamps["submitted"]
    assert second - first >= START_TIMEOUT_S


def test_admission_keeps_only_the_accounts_concurrency_and_a_buffer_at_fal(
    stack: AccountStack, media: dict[str, str]
) -> None:
    # The account runs 2 at once; the stack assumes 2 and keeps a buffer of 1: the rest wait with us
    # (issue 12's target: waiting at fal at most twice the account's concurrency at every sample).
    jobs = stack.submit(media, 10)
    in_queue, in_progress = [], []
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        account = stack.emulator.account(FAL_KEY)
        in_queue.append(account.get("in_queue", 0))
        in_progress.append(account.get("in_progress", 0))
        if all(j.terminal for j in stack.jobs(jobs)):
            break
        time.sleep(0.05)
    ended = stack.jobs(jobs)
    assert [j.status for j in ended] == [JobStatus.completed] * len(jobs), [j.error for j in ended]
    assert max(in_queue) <= 4, max(in_queue)  # waiting at fal: at most twice the account's concurrency
    assert max(in_progress) == 2  # and the account was kept busy


def test_deadline_passing_while_waiting_in_fals_queue_cancels_at_no_cost(
    stack: AccountStack, media: dict[str, str]
) -> None:
    stack.emulator.configure(latency="8")
    try:
        started_before = stack.emulator.account(FAL_KEY).get("started", 0)
        blockers = stack.submit(media, 2)  # they take the account's two runners
        wait_for(lambda: stack.emulator.account(FAL_KEY).get("in_progress", 0) == 2, 30, "both runners busy")
        [late] = stack.submit(media, 1, LIPSYNC_JOB_DEADLINE_S="5")
        [ended] = stack.wait_ended([late], timeout=60)
        assert stack.emulator.account(FAL_KEY)["started"] - started_before == 2  # it never ran
        stack.wait_ended(blockers, timeout=60)
    finally:
        stack.emulator.configure(latency=str(LATENCY_S))
    assert ended.status is JobStatus.failed
    assert ended.error is not None and ended.error.code == "deadline_exceeded"
    assert "cancelled at no cost" in ended.error.message


@pytest.fixture
def webhook_receiver() -> Iterator[tuple[str, list[tuple[dict[str, str], bytes]]]]:
    """Where fal (the emulator) delivers webhooks: records each delivery, answers 200."""
    import http.server
    import threading

    deliveries: list[tuple[dict[str, str], bytes]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            deliveries.append(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1/fal/webhook", deliveries
    server.shutdown()
    server.server_close()


def test_verified_webhook_adopts_the_request_of_a_lost_submit_answer(
    stack: AccountStack, webhook_receiver: tuple[str, list[tuple[dict[str, str], bytes]]], media: dict[str, str]
) -> None:
    from lipsync.fal import FalQueueClient
    from lipsync.falhooks import JwksCache
    from lipsync.jobstore import JobStore
    from lipsync.models import LipsyncInput, MediaInfo
    from producers.gateway.falhook import FalWebhooks

    url, deliveries = webhook_receiver
    settings = settings_from({**stack.env, "LIPSYNC_KEY_PREFIX": f"adopt{uuid.uuid4().hex[:6]}"})
    store = JobStore(stack.client.store.redis, settings.key_prefix)  # the stack's workers do not watch it
    now = time.time()
    info = MediaInfo(staging_key="staging/x", sha256="0" * 64, size=1, container="mp4", duration=3.0)
    job = Job(
        id=store.new_id(), status=JobStatus.queued, request=LipsyncInput(video_url="s3://b/v", audio_url="s3://b/a"),
        request_digest="d", created_at=now, updated_at=now, deadline_at=now + 600,
        inputs={"video": info, "audio": info},
    )  # fmt: skip
    store.create(job, dispatch_lease_s=3600)
    store.advance(job.id, JobStatus.submitting, from_=[JobStatus.queued], due_at=now + 3600)
    store.note(job.id, raw={"submit_claimed_at": repr(now)})  # the POST went out; its answer was lost
    fal = FalQueueClient.from_settings(settings)
    # Inputs fal can download, so that it runs the request and its webhook says OK.
    storage = stack.client.storage
    for name, path, kind in (("video", media["video_3s"], "video/mp4"), ("audio", media["audio_3s"], "audio/wav")):
        storage.upload_file(path, f"staging/adopt-{job.id}-{name}", content_type=kind)
    request = fal.submit(
        {
            "video_url": storage.presign_get(f"staging/adopt-{job.id}-video", 600),
            "audio_url": storage.presign_get(f"staging/adopt-{job.id}-audio", 600),
        },
        marker=job.id,
        webhook_url=f"{url}/{job.id}",
    )
    headers, body = wait_for(lambda: deliveries and deliveries[0], 60, "fal's webhook")
    sent: list[tuple[str, str]] = []
    jwks = JwksCache(f"{stack.emulator.url}/.well-known/jwks.json")
    webhooks = FalWebhooks(settings, store, fal, jwks, lambda *message: sent.append(message))
    outcome = webhooks.handle(job.id, headers, body)
    adopted = store.get(job.id)
    assert outcome == "accepted"
    assert adopted.fal is not None and adopted.fal.request_id == request.request_id
    assert adopted.status is JobStatus.storing  # moved on as a poll would move it
    assert any("adopted fal request" in e.get("event", "") for e in store.events(job.id))
    fal.close()


@pytest.fixture
def output_server(media: dict[str, str]) -> Iterator[tuple[str, int]]:
    """fal's CDN, serving one output video; yields its URL and its size."""
    import http.server
    import threading

    body = Path(media["video_3s"]).read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "video/mp4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/out.mp4", len(body)
    server.shutdown()
    server.server_close()


def test_retry_of_a_job_whose_result_fal_still_keeps_stores_it_and_pays_nothing(
    stack: AccountStack, output_server: tuple[str, int]
) -> None:
    from lipsync.models import FalRequest, File, JobError, LipsyncInput, MediaInfo

    store = stack.client.store
    now = time.time()
    url, size = output_server
    media = MediaInfo(staging_key="staging/none", sha256="0" * 64, size=1, container="mp4", duration=3.0)
    fal = FalRequest(
        request_id="req-kept", status_url="http://x/s", response_url="http://x/r", cancel_url="http://x/c",
        output=File(url=url, content_type="video/mp4", file_name="out.mp4", file_size=size),
    )  # fmt: skip
    job = Job(
        id=store.new_id(), status=JobStatus.queued, request=LipsyncInput(video_url="s3://b/v", audio_url="s3://b/a"),
        request_digest="d", created_at=now, updated_at=now, deadline_at=now + 600,
        inputs={"video": media, "audio": media},
    )  # fmt: skip
    store.create(job, dispatch_lease_s=3600)
    fields = {
        "fal": fal.model_dump(mode="json"),
        "inputs": {k: v.model_dump(mode="json") for k, v in job.inputs.items()},
    }
    store.advance(job.id, JobStatus.storing, from_=[JobStatus.queued], fields=fields, due_at=None)
    error = JobError(code="s3_unavailable", message="gave up on store after 9 attempts: S3 away", stage="store")
    store.fail(job.id, error)  # S3 was away when fal's result was stored; fal still keeps the result
    created_before = stack.emulator.counters()["created"]
    stack.client.retry(job.id)
    [ended] = stack.wait_ended([job], timeout=60)
    assert ended.status is JobStatus.completed, ended.error
    assert ended.fal is not None and ended.fal.request_id == "req-kept"
    assert stack.emulator.counters()["created"] == created_before  # nothing paid again


def test_a_big_batch_does_not_hold_back_another_tenants_job_nor_a_high_priority_one(
    stack: AccountStack, media: dict[str, str]
) -> None:
    from lipsync.models import Priority

    batch = stack.submit(media, 16, how={"tenant": "acme"})
    wait_for(lambda: sum(j.fal is not None for j in stack.jobs(batch)) >= 3, 60, "the batch at fal")
    [single] = stack.submit(media, 1, how={"tenant": "globex"})
    [urgent] = stack.submit(media, 1, how={"tenant": "acme", "priority": Priority.high})
    ended = stack.wait_ended([*batch, single, urgent], timeout=180)
    assert [j.status for j in ended] == [JobStatus.completed] * len(ended), [j.error for j in ended]
    by_id = {j.id: j for j in ended}

    def batch_jobs_sent_while_waiting(job: Job) -> int:
        waited_from, sent_at = by_id[job.id].timestamps["submitting"], by_id[job.id].timestamps["submitted"]
        return sum(waited_from < by_id[j.id].timestamps["submitted"] < sent_at for j in batch)

    # The next free slots go to them (a slot or two already promised or in flight may land first);
    # without the fair queue they wait for a random share of the batch's 13 or so waiting jobs.
    assert batch_jobs_sent_while_waiting(urgent) <= 2
    assert batch_jobs_sent_while_waiting(single) <= 3


@pytest.fixture
def media_server(media: dict[str, str]) -> Iterator[str]:
    """A tenant's media host: serves the sample files by name."""
    import http.server
    import threading

    files = {f"/{name}": Path(path) for name, path in media.items()}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            found = files.get(self.path)
            if found is None:
                self.send_response(404)
                self.end_headers()
                return
            body = found.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_tenant_fairness_through_the_gateway(stack: AccountStack, media_server: str, tmp_path: Path) -> None:
    from lipsync.tenants import TenantStore
    from producers.devstack import free_port, stop_process, wait_for_port

    tenants = TenantStore(stack.client.store.redis, stack.env["LIPSYNC_KEY_PREFIX"])
    suffix = uuid.uuid4().hex[:6]
    keys = {name: tenants.add(f"{name}-{suffix}").api_key.get_secret_value() for name in ("big", "small")}
    port = free_port()
    env = {**stack.env, "LIPSYNC_METRICS_PORT": "0", "LIPSYNC_GATEWAY_RATE_LIMIT_PER_S": "100"}

    gateway = subprocess.Popen(
        [sys.executable, "-m", "producers.cli", "serve", "--port", str(port), "--log-level", "warning"],
        env={**os.environ, **env}, stdout=(tmp_path / "gateway.log").open("ab"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for_port(port, timeout=30, process=gateway)
        body = {"video_url": f"{media_server}/video_3s", "audio_url": f"{media_server}/audio_3s"}

        def post(tenant: str) -> str:
            response = httpx.post(
                f"http://127.0.0.1:{port}/v1/jobs", json=body, headers={"Authorization": f"Bearer {keys[tenant]}"}
            )
            assert response.status_code == 202, response.text
            return str(response.json()["id"])

        batch = [post("big") for _ in range(16)]
        wait_for(lambda: sum(j.fal is not None for j in stack.client.store.get_many(batch)) >= 3, 60, "batch at fal")
        small = [post("small") for _ in range(4)]
        ids = [*batch, *small]

        def all_ended() -> list[Job] | None:
            found = stack.client.store.get_many(ids)
            return found if all(j.terminal for j in found) else None

        ended: list[Job] = wait_for(all_ended, 180, "jobs end")
    finally:
        stop_process(gateway, timeout=20)
    by_id = {j.id: j for j in ended}
    assert all(j.status is JobStatus.completed for j in ended), [j.error for j in ended]
    assert {by_id[j].tenant for j in small} == {f"small-{suffix}"}
    waited_from = min(by_id[j].timestamps["submitting"] for j in small)
    sent_at = max(by_id[j].timestamps["submitted"] for j in small)
    # The small tenant comes back with credit (twice the concurrency hint of 2: 4 slots), so its 4
    # jobs take the next free slots: only a batch job already woken for its slot may land first.
    # Without the credit they alternate with the batch (3 batch jobs among them at least).
    between = sum(waited_from < by_id[j].timestamps["submitted"] < sent_at for j in batch)
    assert between <= 2, f"{between} batch jobs were sent while the small tenant's 4 jobs waited"


def test_lost_answers_of_two_jobs_of_the_same_media_each_adopt_their_own_request(
    stack: AccountStack, media: dict[str, str]
) -> None:
    # Same media (same staging keys, presigned alike within a second), different options: each job
    # must adopt the request its own POST made, never the other's.
    stack.emulator.set_faults(drop_submit="once:4")
    try:
        jobs = [
            stack.client.submit(media["video_3s"], media["audio_5s"], sync_mode=mode)
            for mode in ("cut_off", "loop", "cut_off", "loop")
        ]
        ended = stack.wait_ended(jobs, timeout=120)
    finally:
        stack.emulator.clear_faults()
    assert [j.status for j in ended] == [JobStatus.completed] * 4, [j.error for j in ended]
    assert len({j.fal.request_id for j in ended if j.fal}) == 4  # four requests, one each
    assert set(requests_per_job(stack, jobs).values()) == {1}
    for job in ended:
        expected = 3.0 if job.request.effective_sync_mode.value == "cut_off" else 5.0
        assert job.output is not None and abs((job.output.duration or 0) - expected) <= 0.05, job.output
