"""The engine's outcome rules on real services (Redis, an S3 server, the emulator over HTTP):
a runner whose lease was taken over writes nothing, except a fact that already happened at fal
(its request id), which is written all the same; and the poller hands a job fal has completed
to `store` in the same turn, not when the schedule's safety net comes due minutes later."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from config.settings import Settings
from lipsync.lifecycle import Advance, Outcome, step
from lipsync.models import FalRequest, Job, JobStatus, LipsyncInput
from tests.fixtures.poller import poller_turn
from workers.context import Context, build_context
from workers.runner import Lease, run_step

FAL = FalRequest(request_id="req-settled", status_url="http://x/s", response_url="http://x/r", cancel_url="http://x/c")


@pytest.fixture
def engine(stack_env: dict[str, str]) -> Iterator[tuple[Context, list[tuple[str, str]]]]:
    """A worker's context with its own key prefix; the messages it sends are recorded, not sent."""
    sent: list[tuple[str, str]] = []
    settings = Settings(key_prefix=f"outcomes{uuid.uuid4().hex[:8]}")
    context = build_context(settings, send=lambda name, job_id: sent.append((name, job_id)))
    yield context, sent
    context.fal.close()
    context.redis.close()


def new_job(ctx: Context, deadline_in_s: float = 600) -> Job:
    now = time.time()
    job = Job(
        id=ctx.store.new_id(), status=JobStatus.queued, request=LipsyncInput(video_url="s3://b/v", audio_url="s3://b/a"),
        request_digest="d", created_at=now, updated_at=now, deadline_at=now + deadline_in_s,
    )  # fmt: skip
    ctx.store.create(job, dispatch_lease_s=3600)
    return job


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.1)


def submit_to_fal(ctx: Context, job: Job, media: dict[str, str]) -> FalRequest:
    """The job's request, created at fal (the emulator) from staged inputs, as the submit step makes it."""
    folder = f"staging/{job.id}"
    ctx.storage.upload_file(media["video_3s"], f"{folder}/video.mp4", content_type="video/mp4")
    ctx.storage.upload_file(media["audio_3s"], f"{folder}/audio.wav", content_type="audio/wav")
    arguments = {
        "video_url": ctx.storage.presign_get(f"{folder}/video.mp4", 600),
        "audio_url": ctx.storage.presign_get(f"{folder}/audio.wav", 600),
    }
    return ctx.fal.submit(arguments, marker=job.id)


def at_fal(ctx: Context, job: Job, request: FalRequest) -> None:
    """The job as the submit step leaves it: at fal with its request, its first check due now."""
    fields = {"fal": request.model_dump(mode="json")}
    ctx.store.advance(job.id, JobStatus.submitted, from_=[JobStatus.queued], fields=fields, due_at=time.time())


def taken_over(ctx: Context, job_id: str) -> None:
    """What a lapsed lease leads to: another runner now holds the job (as `begin` would leave it)."""
    ctx.redis.hset(ctx.store.job_key(job_id), mapping={"lease_owner": "newer", "lease_until": repr(time.time() + 600)})


def work_then(outcome: Outcome) -> Callable[[Job, Context, Lease], Outcome]:
    def work(job: Job, ctx: Context, lease: Lease) -> Outcome:
        taken_over(ctx, job.id)  # while this runner worked, its lease lapsed and another took the job
        return outcome

    return work


def test_a_runner_whose_lease_was_taken_over_mid_step_writes_nothing_and_sends_nothing(
    engine: tuple[Context, list[tuple[str, str]]],
) -> None:
    ctx, sent = engine
    job = new_job(ctx)
    stale = Advance(JobStatus.submitting, fields={"expected_duration": 9.0}, event="staged by the stale runner")
    run_step(step("stage"), job.id, ctx, work_then(stale))
    after = ctx.store.get(job.id)
    assert after.status is JobStatus.staging, after.status  # where the stale runner's begin left it
    assert after.expected_duration is None
    assert ctx.store.raw_field(job.id, "lease_owner") == "newer"  # the new runner's lease is untouched
    assert sent == []  # and no next step was sent on the stale runner's word
    assert all(e["event"] != "staged by the stale runner" for e in ctx.store.events(job.id))


def test_fals_request_id_is_written_even_when_the_submits_lease_was_taken_over_during_the_post(
    engine: tuple[Context, list[tuple[str, str]]],
) -> None:
    ctx, _ = engine
    job = new_job(ctx)
    ctx.store.advance(job.id, JobStatus.submitting, from_=[JobStatus.queued], due_at=time.time() + 3600)
    settled = Advance(
        JobStatus.submitted,
        fields={"fal": FAL.model_dump(mode="json")},
        event=f"submitted to fal as {FAL.request_id}",
        settled=True,
    )
    run_step(step("submit"), job.id, ctx, work_then(settled))
    after = ctx.store.get(job.id)
    # fal created (and bills) the request: the job must know it, whoever holds the lease now.
    assert after.fal is not None and after.fal.request_id == FAL.request_id, "a paid request no job knows"
    assert after.status is JobStatus.submitted
    assert ctx.store.raw_field(job.id, "lease_owner") == "newer"  # not taken from the new runner


def test_the_poller_hands_a_job_fal_completed_to_store_in_the_same_turn(
    engine: tuple[Context, list[tuple[str, str]]], media: dict[str, str], emulator: Any
) -> None:
    ctx, sent = engine
    job = new_job(ctx)
    request = submit_to_fal(ctx, job, media)
    wait_until(lambda: emulator.inspect(request.request_id)["status"] == "COMPLETED", 60, "fal completed the request")
    assert emulator.inspect(request.request_id).get("error") is None
    at_fal(ctx, job, request)
    poller_turn(ctx, sent)
    after = ctx.store.get(job.id)
    assert after.status is JobStatus.storing, after.status
    assert after.fal is not None and after.fal.output is not None
    # Handed on at once: the schedule's entry (a transfer lease ahead) is only the safety net.
    assert sent == [("store", job.id)], sent


def test_a_runner_that_finds_its_lease_taken_at_a_heartbeat_stops_working(stack_env: dict[str, str]) -> None:
    """A long transfer renews its lease as it goes; when another runner holds the job, it stops there."""
    sent: list[tuple[str, str]] = []
    settings = Settings(key_prefix=f"outcomes{uuid.uuid4().hex[:8]}", heartbeat_s=0.0)  # every heartbeat renews
    ctx = build_context(settings, send=lambda name, job_id: sent.append((name, job_id)))
    worked_on: list[int] = []

    def transfer(job: Job, ctx: Context, lease: Lease) -> Outcome:
        for chunk in range(5):
            if chunk == 2:
                taken_over(ctx, job.id)
            lease.heartbeat()  # as `HashingWriter(on_write=lease.heartbeat)` does for every chunk
            worked_on.append(chunk)
        return Advance(JobStatus.submitting, event="staged by the stale runner")

    try:
        job = new_job(ctx)
        run_step(step("stage"), job.id, ctx, transfer)
        assert worked_on == [0, 1], f"went on moving bytes for a job another runner holds: chunks {worked_on}"
        assert ctx.store.get(job.id).status is JobStatus.staging
        assert ctx.store.raw_field(job.id, "lease_owner") == "newer" and sent == []
    finally:
        ctx.fal.close()
        ctx.redis.close()


def test_the_poller_fails_a_job_fal_failed_in_fals_own_words(
    engine: tuple[Context, list[tuple[str, str]]], media: dict[str, str], emulator: Any
) -> None:
    """fal answers COMPLETED with an error (the model could not process it): a failure, never an output."""
    ctx, sent = engine
    job = new_job(ctx)
    emulator.set_faults(model_error="once")
    try:
        request = submit_to_fal(ctx, job, media)
    finally:
        emulator.clear_faults()
    wait_until(lambda: emulator.inspect(request.request_id)["status"] == "COMPLETED", 60, "fal completed the request")
    at_fal(ctx, job, request)
    poller_turn(ctx, sent)
    after = ctx.store.get(job.id)
    assert after.status is JobStatus.failed, after.status
    assert after.error is not None and after.error.code == "fal_error" and after.error.fal_error_type, after.error
    assert after.error.message.startswith("fal could not process the request"), after.error.message
    assert sent == [] and after.output is None


def test_the_poller_fails_a_job_past_its_deadline_and_cancels_its_request_at_fal(
    engine: tuple[Context, list[tuple[str, str]]], media: dict[str, str], emulator: Any
) -> None:
    """Still waiting in fal's queue when its deadline has passed: failed in words, and fal is asked to
    drop it (not started, so at no cost). A running request is not cancelled by the deadline: that is
    tests/integration/test_account.py's."""
    ctx, sent = engine
    job = new_job(ctx, deadline_in_s=-60)  # its deadline passed a minute ago
    emulator.configure(latency="60", concurrency=1)
    blocker = None
    try:
        blocker = submit_to_fal(ctx, new_job(ctx), media)  # holds the account's only runner
        wait_until(lambda: emulator.inspect(blocker.request_id)["started"] is not None, 30, "the blocker running")
        request = submit_to_fal(ctx, job, media)  # waits IN_QUEUE behind it
        at_fal(ctx, job, request)
        poller_turn(ctx, sent)
        after = ctx.store.get(job.id)
        assert after.status is JobStatus.failed, after.status
        assert after.error is not None and after.error.code == "deadline_exceeded", after.error
        assert emulator.inspect(request.request_id)["cancel_requested"], "fal was not asked to drop the request"
        assert emulator.inspect(request.request_id)["started"] is None
    finally:
        if blocker is not None:
            with contextlib.suppress(Exception):
                ctx.fal.cancel(blocker)
        emulator.configure(latency="0.3", concurrency=8)
    assert sent == []
