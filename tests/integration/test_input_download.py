"""fal could not download a job's inputs from our S3 (issue 12/16 follow-up): fal ends the request
with its model error `file_download_error`; the model never ran and the inputs are fine. On real
services (Redis, moto's S3 behind a TCP proxy that can be switched off, the emulator over HTTP):
the job is submitted again with fresh URLs after a backoff and completes; after the bound it fails
in words, with its own code; while our S3 is away for us too, it waits instead of resubmitting;
and a webhook saying so takes the same path as a poll."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from config.settings import Settings
from lipsync import jobs
from lipsync.fal import FILE_DOWNLOAD_ERROR, download_failure
from lipsync.lifecycle import step
from lipsync.models import FalRequest, Job, JobStatus, LipsyncInput, MediaInfo
from producers.devstack import free_port
from tests.chaos.proxy import TcpProxy
from tests.fixtures.poller import poller_turn
from workers.context import Context, build_context
from workers.runner import run_step
from workers.submit import submit

Sent = list[tuple[str, str]]


@pytest.fixture
def s3_proxy(s3_server: Any) -> Iterator[TcpProxy]:
    """Our S3 as fal and the workers reach it: through a proxy this test can switch off."""
    proxy = TcpProxy(s3_server.port, free_port())
    proxy.start()
    yield proxy
    proxy.stop()


@pytest.fixture
def engine(stack_env: dict[str, str], s3_proxy: TcpProxy) -> Iterator[tuple[Context, Sent]]:
    """A worker's context with its own key prefix, its S3 through the proxy; messages recorded, not sent."""
    sent: Sent = []
    settings = Settings(
        key_prefix=f"download{uuid.uuid4().hex[:8]}",
        s3_endpoint_url=f"http://127.0.0.1:{s3_proxy.port}",
        fal_download_backoff_s=2.0,
    )
    context = build_context(settings, send=lambda name, job_id: sent.append((name, job_id)))
    yield context, sent
    context.fal.close()
    context.redis.close()


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.05)


def staged_job(ctx: Context, media: dict[str, str]) -> Job:
    """A job whose inputs are staged in our S3, as the stage step leaves it."""
    now = time.time()
    job = Job(
        id=ctx.store.new_id(), status=JobStatus.queued, request=LipsyncInput(video_url="s3://b/v", audio_url="s3://b/a"),
        request_digest="d", created_at=now, updated_at=now, deadline_at=now + 600,
    )  # fmt: skip
    ctx.store.create(job, dispatch_lease_s=3600)
    inputs = {}
    for name, source, key, kind in (
        ("video", media["video_3s"], f"staging/{job.id}/video.mp4", "video/mp4"),
        ("audio", media["audio_3s"], f"staging/{job.id}/audio.wav", "audio/wav"),
    ):
        ctx.storage.upload_file(source, key, content_type=kind)
        inputs[name] = MediaInfo(staging_key=key, sha256="0" * 64, size=1, container=kind, duration=3.0)
    ctx.store.note(job.id, fields={"inputs": {n: i.model_dump(mode="json") for n, i in inputs.items()}})
    return ctx.store.get(job.id)


def sent_while_s3_is_away(ctx: Context, job: Job, proxy: TcpProxy, emulator: Any) -> FalRequest:
    """The job's request made while our S3 refuses every connection: fal cannot download its inputs."""
    arguments = {
        "video_url": ctx.storage.presign_get(job.inputs["video"].staging_key, 600),
        "audio_url": ctx.storage.presign_get(job.inputs["audio"].staging_key, 600),
    }
    proxy.stop()
    try:
        request = ctx.fal.submit(arguments, marker=job.id)
        wait_until(lambda: emulator.inspect(request.request_id)["status"] == "COMPLETED", 60, "fal ended the request")
    finally:
        proxy.start()
    assert download_failure(emulator.inspect(request.request_id)["error_body"]) is not None, "not a failed download"
    fields = {"fal": request.model_dump(mode="json")}
    ctx.store.advance(job.id, JobStatus.submitted, from_=[JobStatus.queued], fields=fields, due_at=time.time())
    return request


def events(ctx: Context, job_id: str) -> list[str]:
    return [entry["event"] for entry in ctx.store.events(job_id) if "event" in entry]


def test_inputs_fal_could_not_download_are_submitted_again_after_a_backoff_and_the_job_completes(
    engine: tuple[Context, Sent], s3_proxy: TcpProxy, media: dict[str, str], emulator: Any
) -> None:
    ctx, sent = engine
    job = staged_job(ctx, media)
    before = emulator.counters()
    first = sent_while_s3_is_away(ctx, job, s3_proxy, emulator)
    poller_turn(ctx, sent)
    after = ctx.store.get(job.id)
    assert after.status is JobStatus.submitting, (after.status, after.error)
    assert after.error is None and after.fal is None, "the failed request is forgotten, not the job"
    assert after.attempts.get("input_download") == 1, after.attempts
    resubmitted = [e for e in events(ctx, job.id) if e.startswith("fal could not download the inputs (video_url: ")]
    assert len(resubmitted) == 1 and "submitting again in" in resubmitted[0], events(ctx, job.id)
    # After a backoff, not at once: nothing sent now; the schedule sends the submit when it is due.
    due = ctx.store.scheduled_at(job.id)
    assert sent == [] and due is not None and due >= time.time() + 1.0, (sent, due)

    run_step(step("submit"), job.id, ctx, submit)  # what the schedule's submit does when due
    again = ctx.store.get(job.id)
    assert again.fal is not None and again.fal.request_id != first.request_id, again.status
    wait_until(lambda: emulator.inspect(again.fal.request_id)["status"] == "COMPLETED", 60, "fal ran the resubmission")  # type: ignore[union-attr]
    poller_turn(ctx, sent)
    assert ctx.store.get(job.id).status is JobStatus.storing
    assert emulator.created_since(before) == 2  # the failed download and the run: the model ran once
    assert emulator.inspect(again.fal.request_id)["error_type"] is None


def test_after_the_bound_the_job_fails_saying_fal_could_not_download_the_inputs_from_our_s3(
    engine: tuple[Context, Sent], s3_proxy: TcpProxy, media: dict[str, str], emulator: Any
) -> None:
    ctx, sent = engine
    job = staged_job(ctx, media)
    bound = ctx.settings.fal_download_resubmits
    ctx.redis.hset(ctx.store.job_key(job.id), jobs.DOWNLOAD_RESUBMITS, str(bound))  # resubmitted `bound` times already
    sent_while_s3_is_away(ctx, job, s3_proxy, emulator)
    poller_turn(ctx, sent)
    after = ctx.store.get(job.id)
    assert after.status is JobStatus.failed, after.status
    assert after.error is not None and after.error.code == "input_download_failed", after.error
    assert after.error.fal_error_type == FILE_DOWNLOAD_ERROR
    message = after.error.message
    assert message.startswith("fal could not download the inputs from our S3 (video_url: "), message
    assert "Failed to download video_url" in message  # fal's own words
    assert f"submitted again {bound} times" in message, message
    assert sent == []


def test_while_our_s3_is_away_for_us_too_the_job_waits_instead_of_resubmitting(
    engine: tuple[Context, Sent], s3_proxy: TcpProxy, media: dict[str, str], emulator: Any
) -> None:
    ctx, sent = engine
    job = staged_job(ctx, media)
    sent_while_s3_is_away(ctx, job, s3_proxy, emulator)
    s3_proxy.stop()
    try:
        poller_turn(ctx, sent)
    finally:
        s3_proxy.start()
    after = ctx.store.get(job.id)
    assert after.status is JobStatus.submitted and after.fal is not None, after.status
    assert "input_download" not in after.attempts, "a resubmission while S3 is away would fail the same way"
    assert any("our S3 cannot be reached from here either" in e for e in events(ctx, job.id)), events(ctx, job.id)
    # S3 is back: the next look resubmits.
    ctx.redis.zadd(ctx.store.waiting_key, {job.id: time.time()})
    poller_turn(ctx, sent)
    assert ctx.store.get(job.id).status is JobStatus.submitting


def test_a_webhook_saying_fal_could_not_download_the_inputs_takes_the_pollers_path(
    engine: tuple[Context, Sent], s3_proxy: TcpProxy, media: dict[str, str], emulator: Any
) -> None:
    """fal's ERROR delivery carries the model error as its payload: the job is not failed; its check
    is brought forward, and the poller resubmits it as for a poll."""
    from lipsync.falhooks import JwksCache
    from producers.gateway.falhook import FalWebhooks

    ctx, sent = engine
    job = staged_job(ctx, media)
    request = sent_while_s3_is_away(ctx, job, s3_proxy, emulator)
    ctx.redis.zadd(ctx.store.waiting_key, {job.id: time.time() + 3600})  # the next poll far away
    found = emulator.inspect(request.request_id)
    delivery = {
        "request_id": request.request_id, "gateway_request_id": request.request_id, "status": "ERROR",
        "payload": found["error_body"], "error": found["error"],
    }  # fmt: skip
    hooks = FalWebhooks(ctx.settings, ctx.store, ctx.fal, JwksCache(f"{emulator.url}/.well-known/jwks.json"), ctx.send)
    assert hooks._move_job(job.id, request.request_id, "ERROR", delivery) == "accepted"
    after = ctx.store.get(job.id)
    assert after.status is JobStatus.submitted and after.error is None, (after.status, after.error)
    due = ctx.redis.zscore(ctx.store.waiting_key, job.id)
    assert due is not None and due <= time.time(), "the poller's look was not brought forward"
    poller_turn(ctx, sent)
    assert ctx.store.get(job.id).status is JobStatus.submitting
    assert ctx.store.get(job.id).attempts.get("input_download") == 1
