"""One job's way and thousands at once, end to end on real services and real workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest

from lipsync.errors import IdempotencyConflict, InvalidInput
from lipsync.models import JobStatus, SyncMode, output_duration
from lipsync.probe import probe

FRAME = 1 / 25  # the sample videos run at 25 fps
pytestmark = pytest.mark.usefixtures("workers")


def stored_output_duration(client: Any, job: Any, tmp_path: Any) -> float:
    key = job.output.url.split("/", 3)[3]
    target = tmp_path / f"{job.id}.mp4"
    with target.open("wb") as handle:
        client.storage.download_to_file(client.settings.s3_bucket, key, handle, max_bytes=10**9)
    return probe(str(target)).duration


def test_cli_submit_local_files_loop_waits_and_prints_the_completed_job(
    stack_env: dict[str, str], media: dict[str, str], client: Any, tmp_path: Any
) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "producers.cli",
            "submit",
            "--video",
            media["video_3s"],
            "--audio",
            media["audio_5s"],
            "--sync-mode",
            "loop",
            "--wait",
            "--json",
            "--timeout",
            "120",
        ],  # fmt: skip
        env={**os.environ, **stack_env},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["status"] == "completed"
    assert record["output"]["url"] == f"s3://{client.settings.s3_bucket}/outputs/{record['id']}.mp4"
    assert abs(record["output"]["duration"] - 5.0) <= FRAME
    assert record["output"]["presigned_url"].startswith("http")
    for field in ("width", "height", "fps", "num_frames", "file_size", "content_type", "file_name"):
        assert record["output"][field], field
    job = client.get(record["id"])
    assert abs(stored_output_duration(client, job, tmp_path) - 5.0) <= FRAME
    assert client.storage.head(f"outputs/{job.id}.mp4") is not None


@pytest.mark.parametrize(
    ("mode", "video", "audio"),
    [
        ("cut_off", "video_3s", "audio_5s"),
        ("cut_off", "video_5s", "audio_3s"),
        ("loop", "video_3s", "audio_5s"),
        ("loop", "video_5s", "audio_3s"),
        ("bounce", "video_3s", "audio_5s"),
        ("silence", "video_5s", "audio_3s"),
        ("silence", "video_3s", "audio_5s"),
        ("remap", "video_3s", "audio_5s"),
        ("remap", "video_5s", "audio_3s"),
    ],
)
def test_each_sync_mode_gives_the_length_the_design_table_says(
    client: Any, media: dict[str, str], tmp_path: Any, mode: str, video: str, audio: str
) -> None:
    job = client.submit(media[video], media[audio], sync_mode=mode)
    (job,) = client.wait([job.id], timeout_s=120)
    assert job.status is JobStatus.completed, job.error
    expected = output_duration(SyncMode(mode), float(video[6]), float(audio[6]))
    assert abs(job.output.duration - expected) <= FRAME
    assert abs(stored_output_duration(client, job, tmp_path) - expected) <= FRAME
    assert job.cost_estimate_usd == pytest.approx(expected * 8 / 60, abs=0.01)


def test_two_hundred_jobs_at_once_all_complete_with_one_fal_request_each(
    client: Any, media: dict[str, str], emulator: Any
) -> None:
    emulator.configure(media_mode="copy", concurrency=50)
    before = emulator.counters()
    try:
        jobs = [client.submit(media["video_3s"], media["audio_3s"]) for _ in range(200)]
        done = client.wait([job.id for job in jobs], timeout_s=400)
    finally:
        emulator.configure(media_mode="encode", concurrency=8)
    statuses = {job.status for job in done}
    assert statuses == {JobStatus.completed}, [j.error for j in done if j.error][:3]
    # Counted by what fal created, not by our header: exactly one request per job.
    assert emulator.created_since(before) == len(jobs)
    assert len({job.fal.request_id for job in done}) == len(jobs)
    by_marker = emulator.counters()["by_marker"]
    assert all(by_marker.get(job.id) == 1 for job in done)
    for job in done:
        assert {"queued", "staging", "submitting", "submitted", "storing", "completed"} <= set(job.timestamps)
        events = client.store.events(job.id)
        assert [e["status"] for e in events][0] == "queued" and events[-1]["status"] == "completed"


def test_same_idempotency_key_returns_the_same_job_and_fal_sees_it_once(
    client: Any, media: dict[str, str], emulator: Any
) -> None:
    before = emulator.counters()
    first = client.submit(media["video_3s"], media["audio_3s"], idempotency_key="trailer-42-de")
    second = client.submit(media["video_3s"], media["audio_3s"], idempotency_key="trailer-42-de")
    assert second.id == first.id
    (job,) = client.wait([first.id], timeout_s=120)
    assert job.status is JobStatus.completed
    assert emulator.created_since(before) == 1
    assert emulator.counters()["by_marker"][first.id] == 1
    with pytest.raises(IdempotencyConflict, match="different request"):
        client.submit(media["video_5s"], media["audio_3s"], idempotency_key="trailer-42-de")


def test_bad_media_fails_in_words_and_other_jobs_complete(
    client: Any, media: dict[str, str], tmp_path: Any, emulator: Any
) -> None:
    fake = tmp_path / "holiday.mp4"
    fake.write_text("this is not a video, just text with a video's name\n" * 20)
    before = emulator.counters()
    bad = client.submit(str(fake), media["audio_3s"])
    audio_as_video = client.submit(media["audio_3s"], media["audio_3s"])
    good = client.submit(media["video_3s"], media["audio_3s"])
    bad, audio_as_video, good = client.wait([bad.id, audio_as_video.id, good.id], timeout_s=120)
    assert good.status is JobStatus.completed
    assert bad.status is JobStatus.failed and bad.error.code == "invalid_input"
    assert "not a readable" in bad.error.message and "Traceback" not in bad.error.message
    assert audio_as_video.status is JobStatus.failed
    assert "no video stream" in audio_as_video.error.message
    # Refused before any money was spent: fal never saw them.
    assert emulator.created_since(before) == 1  # the good one's
    assert bad.id not in emulator.counters()["by_marker"]
    assert bad.fal is None and audio_as_video.fal is None


def test_invalid_options_are_refused_before_a_job_exists(client: Any, media: dict[str, str]) -> None:
    before = client.store.redis.zcard(f"{client.settings.key_prefix}:jobs")
    with pytest.raises(InvalidInput, match="model_mode"):
        client.submit(media["video_3s"], media["audio_3s"], options={"model_mode": "mouth"})
    with pytest.raises(InvalidInput, match="not a known field"):
        client.submit(media["video_3s"], media["audio_3s"], options={"lipstick": True})
    with pytest.raises(InvalidInput, match="prompt"):  # an emotion from the page's list, not free text
        client.submit(media["video_3s"], media["audio_3s"], options={"prompt": "make it smile"})
    assert client.store.redis.zcard(f"{client.settings.key_prefix}:jobs") == before


def test_rate_limited_and_ingress_errors_are_retried_and_paid_once(
    client: Any, media: dict[str, str], emulator: Any
) -> None:
    emulator.set_faults(rate_limit="once:3", ingress_5xx="once:3")
    before = emulator.counters()
    try:
        jobs = [client.submit(media["video_3s"], media["audio_3s"]) for _ in range(4)]
        done = client.wait([job.id for job in jobs], timeout_s=120)
    finally:
        emulator.clear_faults()
    assert {job.status for job in done} == {JobStatus.completed}
    counters = emulator.counters()
    assert counters["faults_injected"].get("rate_limit", 0) - before["faults_injected"].get("rate_limit", 0) == 3
    assert counters["faults_injected"].get("ingress_5xx", 0) - before["faults_injected"].get("ingress_5xx", 0) == 3
    assert emulator.created_since(before) == len(jobs)
    assert all(counters["by_marker"][job.id] == 1 for job in done)
    # A 429 or an ingress 5xx proves nothing was created: the submit is simply sent again, never
    # taken for a lost answer to reconcile (that would wait out the listing's grace for nothing).
    events = [e["event"] for job in done for e in client.store.events(job.id)]
    assert not [e for e in events if "reconcil" in e], events


def test_lost_submit_answer_is_reconciled_without_a_second_request(
    client: Any, media: dict[str, str], emulator: Any
) -> None:
    emulator.set_faults(drop_submit="once")
    before = emulator.counters()
    try:
        job = client.submit(media["video_3s"], media["audio_3s"])
        (job,) = client.wait([job.id], timeout_s=120)
    finally:
        emulator.clear_faults()
    # Issue 12: fal's request listing finds the request the lost answer made; it is adopted.
    assert job.status is JobStatus.completed, job.error
    assert emulator.created_since(before) == 1
    assert emulator.counters()["by_marker"][job.id] == 1


def test_model_error_fails_the_job_with_fals_own_error(client: Any, media: dict[str, str], emulator: Any) -> None:
    emulator.set_faults(model_error="once")
    try:
        job = client.submit(media["video_3s"], media["audio_3s"])
        (job,) = client.wait([job.id], timeout_s=120)
    finally:
        emulator.clear_faults()
    assert job.status is JobStatus.failed
    assert job.error.code == "fal_error" and job.error.fal_error_type
    assert job.error.message.startswith("fal could not process the request")


def test_cancel_stops_the_fal_request_and_retry_starts_over(client: Any, media: dict[str, str], emulator: Any) -> None:
    emulator.configure(latency="5")
    before = emulator.counters()
    try:
        job = client.submit(media["video_3s"], media["audio_3s"])
        deadline = time.monotonic() + 120
        while client.get(job.id).fal is None and time.monotonic() < deadline:
            time.sleep(0.1)
        at_fal = client.get(job.id).fal
        assert at_fal is not None, "the job never reached fal"
        cancelled = client.cancel(job.id)
        assert cancelled.status is JobStatus.cancelled
        # This job's own request was cancelled at fal (asked of fal for it, not counted session-wide).
        deadline = time.monotonic() + 30
        while not emulator.inspect(at_fal.request_id)["cancel_requested"] and time.monotonic() < deadline:
            time.sleep(0.1)
        request = emulator.inspect(at_fal.request_id)
        assert request["cancel_requested"], request["status"]
        deadline = time.monotonic() + 30
        while emulator.inspect(at_fal.request_id)["status"] != "COMPLETED" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert emulator.inspect(at_fal.request_id)["error_type"] == "request_cancelled"
        # fal has ended it; nothing moves the job on from cancelled.
        assert client.get(job.id).status is JobStatus.cancelled
        assert emulator.created_since(before) == 1
    finally:
        emulator.configure(latency="0.3")
    again = client.retry(job.id)
    assert again.status is JobStatus.queued and again.fal is None
    (done,) = client.wait([job.id], timeout_s=120)
    assert done.status is JobStatus.completed
    assert done.fal is not None and done.fal.request_id != at_fal.request_id
    assert emulator.created_since(before) == 2  # the retry paid once more, by the user's choice


def test_output_that_is_not_a_video_fails_the_job_as_bad_output_stores_nothing_and_retry_submits_again(
    client: Any, media: dict[str, str], emulator: Any, tmp_path: Any
) -> None:
    """fal's CDN serves bytes that are not a video, of the size fal announced: only the probe can tell."""
    before = emulator.counters()
    emulator.set_faults(bad_output="once")
    try:
        job = client.submit(media["video_3s"], media["audio_3s"])
        (job,) = client.wait([job.id], timeout_s=120)
    finally:
        emulator.clear_faults()
    assert job.fal is not None and job.fal.output is not None, (job.status, job.error)
    assert "bad_output" in emulator.inspect(job.fal.request_id)["inject"], "the fault missed this job's request"
    assert job.status is JobStatus.failed, job.status
    assert job.error is not None and job.error.code == "bad_output" and job.error.stage == "store", job.error
    assert job.error.message.startswith("fal's output is not a video"), job.error.message
    assert "Traceback" not in job.error.message
    # The size check had nothing to say: what fal announced is what its CDN served.
    served = httpx.get(job.fal.output.url, timeout=30)
    assert served.status_code == 200 and len(served.content) == job.fal.output.file_size
    assert job.output is None
    assert not client.storage.exists(f"outputs/{job.id}.mp4")
    assert emulator.created_since(before) == 1
    # fal's copy is bad (jobs._OUTPUT_LOST): a retry does not store it again, it submits the job anew.
    again = client.retry(job.id)
    assert again.status is JobStatus.queued and again.fal is None
    (done,) = client.wait([job.id], timeout_s=120)
    assert done.status is JobStatus.completed, done.error
    assert done.fal is not None and done.fal.request_id != job.fal.request_id
    assert abs(stored_output_duration(client, done, tmp_path) - 3.0) <= FRAME
    assert emulator.created_since(before) == 2  # the retry paid once more, by the user's choice
