"""The engine's runner on real services (Redis, an S3 server, an HTTP server for fal's output):
a step's outcome is written once, by the runner, and a failure is never a silent success."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from config.settings import Settings
from lipsync.lifecycle import step
from lipsync.models import FalRequest, File, Job, JobStatus, LipsyncInput, MediaInfo
from workers.context import Context, build_context
from workers.runner import run_step
from workers.store import store


@pytest.fixture
def output_server(media: dict[str, str]) -> Iterator[tuple[str, int]]:
    """fal's CDN, serving one output video; yields its URL and its size."""
    body = Path(media["video_3s"]).read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "video/mp4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/out.mp4", len(body)
    server.shutdown()
    server.server_close()


@pytest.fixture
def ctx(stack_env: dict[str, str]) -> Iterator[Context]:
    sent: list[tuple[str, str]] = []
    context = build_context(Settings(key_prefix=f"engine{time.time_ns()}"), send=lambda *message: sent.append(message))
    yield context
    context.redis.close()


def job_at_store(ctx: Context, output: File) -> Job:
    now = time.time()
    media = MediaInfo(staging_key="staging/x", sha256="0" * 64, size=1, container="mp4", duration=3.0)
    fal = FalRequest(
        request_id="req-size",
        status_url="http://x/s",
        response_url="http://x/r",
        cancel_url="http://x/c",
        output=output,
    )
    job = Job(
        id=ctx.store.new_id(), status=JobStatus.queued, request=LipsyncInput(video_url="s3://b/v", audio_url="s3://b/a"),
        request_digest="d", created_at=now, updated_at=now, deadline_at=now + 600,
        inputs={"video": media, "audio": media},
    )  # fmt: skip
    ctx.store.create(job, dispatch_lease_s=3600)
    fields = {
        "fal": fal.model_dump(mode="json"),
        "inputs": {k: v.model_dump(mode="json") for k, v in job.inputs.items()},
    }
    ctx.store.advance(job.id, JobStatus.storing, from_=[JobStatus.queued], fields=fields, due_at=now + 3600)
    return job


def test_output_shorter_than_fal_announced_is_fetched_again_never_stored(
    ctx: Context, output_server: tuple[str, int]
) -> None:
    url, size = output_server
    job = job_at_store(ctx, File(url=url, content_type="video/mp4", file_size=size + 1000))
    run_step(step("store"), job.id, ctx, store)
    after = ctx.store.get(job.id)
    assert after.status is JobStatus.storing and after.attempts.get("retry_store") == 1
    assert any(
        "output_size_mismatch" in e["event"] or "fetching it again" in e["event"] for e in ctx.store.events(job.id)
    )
    assert ctx.storage.head(f"{ctx.settings.output_prefix}/{job.id}.mp4") is None
    assert ctx.store.raw_field(job.id, "lease_owner") is None  # the retry's write gave the lease back


def test_output_of_the_announced_size_completes_the_job_once(ctx: Context, output_server: tuple[str, int]) -> None:
    url, size = output_server
    job = job_at_store(ctx, File(url=url, content_type="video/mp4", file_size=size))
    run_step(step("store"), job.id, ctx, store)
    after = ctx.store.get(job.id)
    assert after.status is JobStatus.completed and after.output is not None and after.output.file_size == size
    assert ctx.store.scheduled_at(job.id) is None
    run_step(step("store"), job.id, ctx, store)  # a duplicate message changes nothing
    assert [e["status"] for e in ctx.store.events(job.id)].count("completed") == 1


def test_a_duplicate_message_for_a_cancelled_job_keeps_its_callback_due(ctx: Context) -> None:
    now = time.time()
    job = Job(
        id=ctx.store.new_id(), status=JobStatus.queued, request=LipsyncInput(video_url="s3://b/v", audio_url="s3://b/a"),
        request_digest="d", created_at=now, updated_at=now, deadline_at=now + 600,
        tenant="acme", callback_url="https://example.com/hook",
    )  # fmt: skip
    ctx.store.create(job, dispatch_lease_s=3600)
    assert ctx.store.cancel(job.id, event="cancelled by the test").applied
    assert ctx.redis.zscore(ctx.store.callbacks_key, job.id) is not None
    run_step(step("stage"), job.id, ctx, store)  # the stage message, arriving after the cancel
    assert ctx.store.scheduled_at(job.id) is None
    assert ctx.redis.zscore(ctx.store.callbacks_key, job.id) is not None  # the tenant still hears of it
