"""Hostile and broken input, through the real producer path (Python API and the `lipsync` CLI).

Every case asserts a specific error a person can read, and that nothing else happened: a
request refused by the producer leaves no job behind; a job refused by a worker fails in
the stage that found the problem, never reaches fal (no money spent) and stores no output;
the worker survives and good jobs around it complete.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
from typing import Any

import pytest

from lipsync.errors import IdempotencyConflict, InvalidInput, TooLarge, UnsafeURL
from lipsync.models import Job, JobStatus
from tests.hostile.conftest import BUCKET, MAX_INPUT_BYTES, HostileStack

INTERNAL = "private or internal address"


def job_count(hostile: HostileStack) -> int:
    return int(hostile.client.redis.zcard("hostile:jobs"))


def refused_by_producer(
    hostile: HostileStack, error: type[Exception], fragment: str, video: str, audio: str, **options: Any
) -> str:
    before = job_count(hostile)
    with pytest.raises(error) as raised:
        hostile.client.submit(video, audio, **options)
    message = str(raised.value)
    assert fragment in message
    assert "Traceback" not in message
    assert job_count(hostile) == before, "a refused request must leave no job behind"
    return message


def failed_by_worker(hostile: HostileStack, video: str, audio: str, code: str, fragment: str, **options: Any) -> Job:
    job = hostile.client.submit(video, audio, **options)
    (job,) = hostile.client.wait([job.id], timeout_s=60, interval_s=0.2)
    assert job.status is JobStatus.failed, (job.status, job.error)
    assert job.error is not None
    assert job.error.code == code, job.error
    assert fragment in job.error.message, job.error.message
    assert job.error.stage == "stage"
    assert "Traceback" not in job.error.message and "X-Amz-Signature" not in job.error.message
    assert job.fal is None and job.id not in hostile.emulator.counters()["by_marker"], "fal must never see it"
    assert hostile.client.storage.head(f"outputs/{job.id}.mp4") is None
    return job


# URLs refused before a job exists ------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://127.0.0.1:{web}/file/x.mp4", INTERNAL),
        ("http://[::1]:{web}/file/x.mp4", INTERNAL),
        ("http://127.1/x.mp4", INTERNAL),  # shorthand for 127.0.0.1
        ("http://2130706433/x.mp4", INTERNAL),  # 127.0.0.1 as one decimal number
        ("http://0x7f.0.0.1/x.mp4", INTERNAL),  # and in hex
        ("http://[::ffff:127.0.0.1]/x.mp4", INTERNAL),  # IPv4-mapped IPv6
        ("http://0.0.0.0/x.mp4", INTERNAL),
        ("http://10.0.0.5/x.mp4", INTERNAL),
        ("http://172.16.4.4/x.mp4", INTERNAL),
        ("http://192.168.1.10/x.mp4", INTERNAL),
        ("http://100.64.0.1/x.mp4", INTERNAL),  # carrier-grade NAT
        ("http://169.254.169.254/latest/meta-data/iam/security-credentials/", INTERNAL),
        ("http://169.254.10.20/x.mp4", INTERNAL),  # link-local
        ("http://[fe80::1]/x.mp4", INTERNAL),
        ("http://[fd00::1]/x.mp4", INTERNAL),  # unique local IPv6
        ("http://media.example.com/x.mp4", "(127.0.0.1)"),  # a public-looking name for 127.0.0.1
        ("https://cdn.example.net/x.mp4", "(169.254.169.254)"),
        ("http://assets.example.org/x.mp4", "(10.1.2.3)"),
        ("http://user:secret@example.com/x.mp4", "user name or password"),
    ],
    ids=lambda value: value if not value.startswith("http") else None,
)
def test_url_to_an_internal_address_is_refused_before_a_job_exists(
    hostile: HostileStack, bad_media: dict[str, str], url: str, fragment: str
) -> None:
    url = url.format(web=hostile.web_port)
    message = refused_by_producer(hostile, UnsafeURL, fragment, url, bad_media["audio"])
    assert "secret" not in message


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ("file:///etc/passwd", "uses the scheme 'file'"),
        ("gopher://127.0.0.1:6379/_FLUSHALL", "uses the scheme 'gopher'"),
        ("ftp://example.com/x.mp4", "uses the scheme 'ftp'"),
        ("dict://127.0.0.1:11211/stats", "uses the scheme 'dict'"),
        ("http://example.com:99999/x.mp4", "invalid port"),
        ("http:///x.mp4", "has no host"),
    ],
)
def test_non_http_schemes_and_broken_urls_are_refused(
    hostile: HostileStack, bad_media: dict[str, str], source: str, fragment: str
) -> None:
    refused_by_producer(hostile, InvalidInput, fragment, source, bad_media["audio"])


# redirects, sizes and slowness: found by the worker's fetcher ---------------------------
@pytest.mark.parametrize(
    ("target", "fragment"),
    [
        ("http://127.0.0.1:{web}/file/good.mp4", "(127.0.0.1)"),
        ("http://[::1]:{web}/file/good.mp4", "(::1)"),
        ("http://169.254.169.254/latest/meta-data/", "(169.254.169.254)"),
        ("http://10.0.0.1/x.mp4", "(10.0.0.1)"),
        ("http://media.example.com:{web}/file/good.mp4", "(127.0.0.1)"),
        ("file:///etc/passwd", "uses the scheme 'file'"),
    ],
)
def test_redirect_to_an_internal_address_fails_the_job_unfetched(
    hostile: HostileStack, bad_media: dict[str, str], target: str, fragment: str
) -> None:
    hostile.serve("good.mp4", open(bad_media["video"], "rb").read())  # noqa: SIM115
    target = target.format(web=hostile.web_port)
    video = hostile.web("redirect?to=" + urllib.parse.quote(target, safe=""))
    failed_by_worker(hostile, video, bad_media["audio"], "unsafe_url", fragment)


def test_endless_redirects_fail_the_job(hostile: HostileStack, bad_media: dict[str, str]) -> None:
    failed_by_worker(hostile, hostile.web("loop/0"), bad_media["audio"], "invalid_input", "redirected more than 5")


def test_input_declared_over_the_cap_is_not_downloaded(hostile: HostileStack, bad_media: dict[str, str]) -> None:
    failed_by_worker(
        hostile, hostile.web("big"), bad_media["audio"], "too_large", f"over the limit of {MAX_INPUT_BYTES} bytes"
    )


def test_input_without_a_length_is_cut_off_at_the_cap(hostile: HostileStack, bad_media: dict[str, str]) -> None:
    failed_by_worker(hostile, hostile.web("chunked-big"), bad_media["audio"], "too_large", "sent more than the limit")


def test_input_whose_content_length_lies_fails_after_bounded_retries(
    hostile: HostileStack, bad_media: dict[str, str]
) -> None:
    job = failed_by_worker(hostile, hostile.web("short"), bad_media["audio"], "fetch_failed", "gave up on stage after")
    assert "RemoteProtocolError" in job.error.message  # type: ignore[union-attr]


def test_server_trickling_bytes_forever_is_cut_off_at_the_time_cap(
    hostile: HostileStack, bad_media: dict[str, str]
) -> None:
    failed_by_worker(hostile, hostile.web("trickle"), bad_media["audio"], "fetch_too_slow", "did not finish sending")


def test_zero_byte_download_fails_the_job(hostile: HostileStack, bad_media: dict[str, str]) -> None:
    failed_by_worker(hostile, hostile.web("empty"), bad_media["audio"], "invalid_input", "is empty (0 bytes)")


# files that are not what they claim ---------------------------------------------------------
@pytest.mark.parametrize(
    ("video", "audio", "fragment"),
    [
        ("text.mp4", "audio", "not a readable audio or video file"),
        ("image.mp4", "audio", "not a readable audio or video file"),
        ("random.mp4", "audio", "not a readable audio or video file"),
        ("truncated.mp4", "audio", "not a readable audio or video file"),
        ("audio", "audio", "the video input has no video stream"),
        ("audio_in_mp4", "audio", "the video input has no video stream (it is mp4 with audio only)"),
        ("video", "video", "the audio input has no audio stream"),
        ("video", "text.mp4", "not a readable audio or video file"),
        ("video_5s", "audio", "the video input lasts 5.0 s, over the limit of 4 s"),
        ("video", "audio_5s", "the audio input lasts 5.0 s, over the limit of 4 s"),
        ("video_720p", "audio", "the video is 1280x720; the largest accepted is 640x640"),
    ],
)
def test_broken_or_mislabelled_media_fails_in_words_before_fal(
    hostile: HostileStack, bad_media: dict[str, str], video: str, audio: str, fragment: str
) -> None:
    failed_by_worker(hostile, bad_media[video], bad_media[audio], "invalid_input", fragment)


@pytest.mark.parametrize(
    ("name", "error", "fragment"),
    [
        ("empty.mp4", InvalidInput, "is empty (0 bytes)"),
        ("oversized.mp4", TooLarge, f"over the limit of {MAX_INPUT_BYTES} bytes"),
        ("/nonexistent/clip.mp4", InvalidInput, "does not exist"),
        ("/tmp", InvalidInput, "is not a regular file"),
    ],
)
def test_local_files_that_cannot_be_sent_are_refused(
    hostile: HostileStack, bad_media: dict[str, str], name: str, error: type[Exception], fragment: str
) -> None:
    refused_by_producer(hostile, error, fragment, bad_media.get(name, name), bad_media["audio"])


# data: URIs and s3:// URIs -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("uri", "error", "fragment"),
    [
        ("data:video/mp4;base64,!!!not-base64!!!", InvalidInput, "does not hold valid base64"),
        ("data:video/mp4;base64,QUJD=EF", InvalidInput, "does not hold valid base64"),
        ("data:,", InvalidInput, "holds no data (0 bytes)"),
        ("data:video/mp4", InvalidInput, "data: URI is malformed"),
        ("data:video/mp4;base64," + "A" * (MAX_INPUT_BYTES * 4 // 3 + 8), TooLarge, "over the limit"),
        ("s3://", InvalidInput, "names no bucket"),
        ("s3://Bad_Bucket/x.mp4", InvalidInput, "invalid bucket name"),
        ("s3://a/x.mp4", InvalidInput, "invalid bucket name"),
        (f"s3://{BUCKET}", InvalidInput, "names no object"),
        (f"s3://{BUCKET}/folder/", InvalidInput, "names no object"),
        (f"s3://{BUCKET}/bad\x01key.mp4", InvalidInput, "invalid key"),
    ],
    ids=lambda value: value[:40] if isinstance(value, str) else None,
)
def test_malformed_data_and_s3_uris_are_refused(
    hostile: HostileStack, bad_media: dict[str, str], uri: str, error: type[Exception], fragment: str
) -> None:
    refused_by_producer(hostile, error, fragment, uri, bad_media["audio"])


def test_data_uri_holding_text_fails_at_staging(hostile: HostileStack, bad_media: dict[str, str]) -> None:
    uri = "data:video/mp4;base64,VGhpcyBpcyBub3QgYSB2aWRlby4K"
    failed_by_worker(hostile, uri, bad_media["audio"], "invalid_input", "not a readable audio or video file")


@pytest.mark.parametrize("uri", [f"s3://{BUCKET}/missing/nothing-here.mp4", "s3://no-such-bucket-anywhere/clip.mp4"])
def test_s3_object_that_does_not_exist_fails_the_job(
    hostile: HostileStack, bad_media: dict[str, str], uri: str
) -> None:
    failed_by_worker(hostile, uri, bad_media["audio"], "invalid_input", "does not exist")


# options: every enum and type error, unknown fields --------------------------------------
@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"sync_mode": "lipsync"}, "sync_mode: Input should be 'cut_off', 'loop', 'bounce', 'silence' or 'remap'"),
        ({"options": {"sync_mode": "loop2"}}, "options.sync_mode: Input should be"),
        (
            {"options": {"model_mode": "mouth"}},
            "options.model_mode: Input should be 'lips', 'face', 'head', 'lipsync', 'emotion' or 'talking_head'",
        ),
        ({"options": {"temperature": "hot"}}, "options.temperature: Input should be a valid number"),
        ({"options": {"occlusion_detection_enabled": "maybe"}}, "options.occlusion_detection_enabled"),
        ({"options": {"prompt": "make it smile"}}, "options.prompt: Input should be 'happy', 'sad', 'angry'"),
        ({"options": {"prompt": 42}}, "options.prompt: Input should be"),
        (
            {"options": {"active_speaker_detection": {"coordinates": [1]}}},
            "options.active_speaker_detection.coordinates: List should have at least 2 items",
        ),
        (
            {"options": {"active_speaker_detection": {"frame_number": "7"}}},
            "options.active_speaker_detection.frame_number: Input should be a valid integer",
        ),
        (
            {"options": {"active_speaker_detection": {"bounding_boxes": [[1, 2, 3]]}}},
            "options.active_speaker_detection.bounding_boxes.0",
        ),
        ({"options": {"active_speaker_detection": "yes"}}, "options.active_speaker_detection: Input should be"),
        ({"options": {"lipstick": True}}, "options.lipstick: is not a known field"),
        (
            {"options": {"active_speaker_detection": {"face": "left"}}},
            "options.active_speaker_detection.face: is not a known field",
        ),
    ],
    ids=lambda value: json.dumps(value)[:50],
)
def test_every_option_error_is_refused_before_a_job_exists(
    hostile: HostileStack, bad_media: dict[str, str], options: dict[str, Any], fragment: str
) -> None:
    message = refused_by_producer(hostile, InvalidInput, fragment, bad_media["video"], bad_media["audio"], **options)
    assert message.startswith("invalid request: ")


# idempotency keys, names and keys that try to escape -------------------------------------------
def test_idempotency_key_reused_for_a_different_request_is_refused(
    hostile: HostileStack, bad_media: dict[str, str]
) -> None:
    first = hostile.client.submit(bad_media["video"], bad_media["audio"], idempotency_key="reuse-me")
    refused_by_producer(
        hostile, IdempotencyConflict, f"already used for job {first.id} with a different request",
        bad_media["video"], bad_media["audio"], sync_mode="loop", idempotency_key="reuse-me",
    )  # fmt: skip
    again = hostile.client.submit(bad_media["video"], bad_media["audio"], idempotency_key="reuse-me")
    assert again.id == first.id
    (done,) = hostile.client.wait([first.id], timeout_s=60, interval_s=0.2)
    assert done.status is JobStatus.completed, done.error


def test_idempotency_key_too_long_is_refused(hostile: HostileStack, bad_media: dict[str, str]) -> None:
    refused_by_producer(
        hostile, InvalidInput, "1 to 200 characters", bad_media["video"], bad_media["audio"], idempotency_key="k" * 201
    )


def test_unicode_and_traversal_in_names_and_keys_never_reach_storage_keys(
    hostile: HostileStack, bad_media: dict[str, str]
) -> None:
    key = "../../hostile:job:x/ünïcødé\u202e名前"
    unicode_job = hostile.client.submit(bad_media["unicode"], bad_media["audio"], idempotency_key=key)
    traversal_job = hostile.client.submit(bad_media["traversal"], bad_media["audio"], metadata={"name": "../../etc"})
    assert hostile.client.submit(bad_media["unicode"], bad_media["audio"], idempotency_key=key).id == unicode_job.id
    for job in (unicode_job, traversal_job):
        # The upload key is the content's digest: a user's file name never becomes part of a key.
        assert job.request.video_url.startswith(f"s3://{BUCKET}/uploads/")
        name = job.request.video_url.rsplit("/", 1)[1]
        assert len(name) == len("0" * 64 + ".mp4") and name.endswith(".mp4") and ".." not in name
    assert hostile.client.redis.exists(f"hostile:idem:{key}")
    assert not hostile.client.redis.exists("hostile:job:x")
    done = hostile.client.wait([unicode_job.id, traversal_job.id], timeout_s=60, interval_s=0.2)
    assert [job.status for job in done] == [JobStatus.completed] * 2, [job.error for job in done]
    for job in done:
        assert job.output is not None and job.output.url == f"s3://{BUCKET}/outputs/{job.id}.mp4"


# the same through the CLI -------------------------------------------------------------------
def run_cli(hostile: HostileStack, *arguments: str) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("LIPSYNC_")}
    return subprocess.run(
        [sys.executable, "-m", "producers.cli", "submit", *arguments],
        env={**env, **hostile.env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        (["--video", "http://169.254.169.254/latest/meta-data/"], INTERNAL),
        (["--video", "http://media.example.com/clip.mp4"], "(127.0.0.1)"),
        (["--video", "file:///etc/passwd"], "uses the scheme 'file'"),
        (["--options", "{not json"], "--options is not valid JSON"),
        (["--options", "[1, 2]"], "--options must be a JSON object"),
        (["--options", '{"model_mode": "mouth"}'], "options.model_mode: Input should be"),
        (["--sync-mode", "lipsync"], "sync_mode: Input should be 'cut_off'"),
        (["--metadata", "{}", "--idempotency-key", ""], "1 to 200 characters"),
    ],
    ids=lambda value: " ".join(value)[:40] if isinstance(value, list) else None,
)
def test_cli_refuses_hostile_input_in_one_line_with_exit_status_2(
    hostile: HostileStack, bad_media: dict[str, str], arguments: list[str], fragment: str
) -> None:
    before = job_count(hostile)
    defaults = {"--video": bad_media["video"], "--audio": bad_media["audio"]}
    for flag in list(defaults):
        if flag in arguments:
            defaults.pop(flag)
    result = run_cli(hostile, *[item for pair in defaults.items() for item in pair], *arguments)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert fragment in " ".join(result.stderr.split()), result.stderr
    assert "Traceback" not in result.stderr
    assert job_count(hostile) == before


@pytest.mark.parametrize(
    ("video", "code", "fragment"),
    [
        ("redirect-to-metadata", "unsafe_url", "(169.254.169.254)"),
        ("text.mp4", "invalid_input", "not a readable audio or video file"),
    ],
)
def test_cli_wait_reports_a_job_the_worker_refused(
    hostile: HostileStack, bad_media: dict[str, str], video: str, code: str, fragment: str
) -> None:
    source = bad_media.get(video) or hostile.web(
        "redirect?to=" + urllib.parse.quote("http://169.254.169.254/latest/meta-data/", safe="")
    )
    result = run_cli(hostile, "--video", source, "--audio", bad_media["audio"], "--wait", "--json", "--timeout", "60")
    assert result.returncode == 1, result.stderr
    record = json.loads(result.stdout)
    assert record["status"] == "failed" and record["error"]["code"] == code
    assert fragment in record["error"]["message"]
    assert record["fal"] is None and record["output"] is None


def test_after_all_that_the_worker_is_alive_and_a_good_job_completes(
    hostile: HostileStack, bad_media: dict[str, str]
) -> None:
    job = hostile.client.submit(bad_media["video"], bad_media["audio"], sync_mode="loop")
    (job,) = hostile.client.wait([job.id], timeout_s=60, interval_s=0.2)
    assert job.status is JobStatus.completed, job.error
    assert job.output is not None and job.output.duration == pytest.approx(1.0, abs=0.05)
    log = (hostile.logdir / "worker-hostile.log").read_text(errors="replace")
    assert "Unrecoverable error" not in log and "hostile-suite-fal-key" not in log
