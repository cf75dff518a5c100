"""The fal emulator over HTTP: the queue protocol as fal speaks it, real media work, faults.

These talk to the emulator process directly (httpx, and the official fal-client over TLS);
the pipeline's own tests use it through the workers.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from emulator.control import EmulatorProcess, start_emulator
from emulator.webhooks import retry_gaps
from lipsync.errors import RetryableError
from lipsync.fal import FalHeaders, FalQueueClient, SubmitOutcomeUnknown
from lipsync.models import FalPriority, SyncMode, output_duration
from lipsync.probe import probe
from producers.devstack import free_port, wait_for_port
from tests.conftest import EMULATOR_LATENCY

APP = "fal-ai/sync-lipsync/v3"
KEY = {"Authorization": "Key emulator-test-key"}
FRAME = 1 / 25


def data_uri(path: str, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode()


@pytest.fixture(scope="module")
def fal(emulator: EmulatorProcess) -> Iterator[httpx.Client]:
    emulator.reset()
    # fal's webhook retry schedule spans 2 hours; a thousandth of it is 7.2 s.
    emulator.configure(latency="0.2", concurrency=8, media_mode="encode", webhook_time_scale=0.001)
    with httpx.Client(base_url=emulator.url, headers=KEY, timeout=60) as http:
        yield http
    emulator.reset()
    emulator.configure(latency=EMULATOR_LATENCY, concurrency=8, media_mode="encode", webhook_time_scale=1.0)


@pytest.fixture(scope="module")
def inputs(media: dict[str, str]) -> dict[str, str]:
    return {
        "video_3s": data_uri(media["video_3s"], "video/mp4"),
        "video_5s": data_uri(media["video_5s"], "video/mp4"),
        "audio_3s": data_uri(media["audio_3s"], "audio/wav"),
        "audio_5s": data_uri(media["audio_5s"], "audio/wav"),
    }


def submit(fal: httpx.Client, body: dict[str, Any], **params: str) -> httpx.Response:
    return fal.post(f"/{APP}", json=body, params=params or None)


def wait_done(fal: httpx.Client, status_url: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = fal.get(status_url, params={"logs": "1"})
        if answer.status_code == 200:
            body: dict[str, Any] = answer.json()
            return body
        assert answer.status_code == 202, answer.text
        time.sleep(0.05)
    raise AssertionError("the request did not complete in time")


def idle(emulator: EmulatorProcess, timeout: float = 30) -> None:
    """Wait until earlier tests' requests have finished, so positions and slots are ours."""
    deadline = time.monotonic() + timeout
    while (counters := emulator.counters())["in_queue"] + counters["in_progress"] > 0:
        assert time.monotonic() < deadline, counters
        time.sleep(0.05)


# protocol ----------------------------------------------------------------------------------
def test_submit_answers_urls_built_from_the_request_host_and_the_request_id_header(
    fal: httpx.Client, emulator: EmulatorProcess, inputs: dict[str, str]
) -> None:
    answer = submit(fal, {"video_url": inputs["video_3s"], "audio_url": inputs["audio_3s"]})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    request_id = body["request_id"]
    assert answer.headers["x-fal-request-id"] == request_id
    assert body["status"] == "IN_QUEUE" and body["gateway_request_id"] == request_id
    root = f"{emulator.url}/fal-ai/sync-lipsync/requests/{request_id}"
    assert body["status_url"] == f"{root}/status"
    assert body["response_url"] == root
    assert body["cancel_url"] == f"{root}/cancel"
    assert isinstance(body["queue_position"], int)
    done = wait_done(fal, body["status_url"])
    assert done["status"] == "COMPLETED" and "error" not in done
    assert done["metrics"]["inference_time"] > 0
    assert all({"message", "level", "source", "timestamp"} <= set(entry) for entry in done["logs"])
    result = fal.get(body["response_url"])
    assert result.status_code == 200
    video = result.json()["video"]
    assert video["content_type"] == "video/mp4" and video["file_size"] > 0
    assert fal.get(f"{root}/response").json() == result.json()
    assert fal.get(video["url"]).content[:12].find(b"ftyp") == 4


def test_only_fals_owner_alias_paths_are_served(fal: httpx.Client, inputs: dict[str, str]) -> None:
    """Status, result and cancel live under owner/alias only; the app's sub-path there is a 404."""
    body = submit(fal, {"video_url": inputs["video_3s"], "audio_url": inputs["audio_3s"]}).json()
    request_id = body["request_id"]
    assert fal.get(body["status_url"]).status_code in (200, 202)
    for wrong in (
        f"/{APP}/requests/{request_id}/status",  # the full path with the sub-path
        f"/{APP}/requests/{request_id}",
        f"/fal-ai/other-app/requests/{request_id}/status",  # another app's queue
        f"/fal-ai/sync-lipsync/v3/extra/requests/{request_id}",
    ):
        assert fal.get(wrong).status_code == 404, wrong
    pair = {"video_url": inputs["video_3s"], "audio_url": inputs["audio_3s"]}
    assert fal.post("/fal-ai/flux/dev", json=pair).status_code == 404
    assert fal.post("/fal-ai/sync-lipsync/v2", json=pair).status_code == 404


def test_missing_key_is_401_and_unknown_request_is_404(fal: httpx.Client, emulator: EmulatorProcess) -> None:
    assert httpx.post(f"{emulator.url}/{APP}", json={}).status_code == 401
    unknown = f"/fal-ai/sync-lipsync/requests/{'0' * 8}-0000-0000-0000-{'0' * 12}"
    assert fal.get(f"{unknown}/status").status_code == 404
    assert fal.get(unknown).status_code == 404
    assert fal.put(f"{unknown}/cancel").status_code == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"audio_url": "data:audio/wav;base64,AA=="}, "video_url"),
        ({"video_url": "x", "audio_url": "y", "sync_mode": "stretch"}, "sync_mode"),
        ({"video_url": "x", "audio_url": "y", "options": {"model_mode": "mouth"}}, "options"),
        ({"video_url": "x", "audio_url": "y", "options": {"temperature": "hot"}}, "options"),
        ({"video_url": "x", "audio_url": "y", "lipstick": True}, "lipstick"),
    ],
)
def test_invalid_input_is_422_with_fal_shaped_detail(fal: httpx.Client, body: dict[str, Any], field: str) -> None:
    answer = submit(fal, body)
    assert answer.status_code == 422
    detail = answer.json()["detail"]
    assert detail[0]["loc"][:2] == ["body", field]
    assert detail[0]["msg"] and detail[0]["type"]


def test_status_without_logs_and_the_event_stream(fal: httpx.Client, inputs: dict[str, str]) -> None:
    body = submit(fal, {"video_url": inputs["video_3s"], "audio_url": inputs["audio_3s"]}).json()
    for flag in ("0", "false"):
        assert fal.get(body["status_url"], params={"logs": flag}).json()["logs"] is None
    events = []
    with fal.stream("GET", body["status_url"] + "/stream", params={"logs": "true"}) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert events[-1]["status"] == "COMPLETED"
    assert {e["status"] for e in events} <= {"IN_QUEUE", "IN_PROGRESS", "COMPLETED"}


def test_result_before_completion_is_400_in_progress(
    fal: httpx.Client, emulator: EmulatorProcess, inputs: dict[str, str]
) -> None:
    emulator.configure(latency="2")
    try:
        body = submit(fal, {"video_url": inputs["video_3s"], "audio_url": inputs["audio_3s"]}).json()
        early = fal.get(body["response_url"])
        assert early.status_code == 400
        assert early.json() == {"detail": "Request is still in progress"}
    finally:
        emulator.configure(latency="0.2")


def test_concurrency_limit_keeps_the_rest_in_queue_with_true_positions(
    fal: httpx.Client, emulator: EmulatorProcess, inputs: dict[str, str]
) -> None:
    idle(emulator)
    emulator.configure(latency="3", concurrency=1)
    try:
        bodies = [
            submit(fal, {"video_url": inputs["video_3s"], "audio_url": inputs["audio_3s"]}).json() for _ in range(4)
        ]
        time.sleep(0.3)
        states = [fal.get(b["status_url"]).json() for b in bodies]
        assert states[0]["status"] == "IN_PROGRESS"
        assert [s["queue_position"] for s in states[1:]] == [0, 1, 2]
        assert all(s["status"] == "IN_QUEUE" for s in states[1:])
        # Cancelling a queued request moves the ones behind it up.
        assert fal.put(bodies[1]["cancel_url"]).status_code == 202
        time.sleep(0.1)
        assert [fal.get(b["status_url"]).json()["queue_position"] for b in bodies[2:]] == [0, 1]
        cancelled = fal.get(bodies[1]["status_url"]).json()
        assert cancelled["status"] == "COMPLETED" and cancelled["error_type"] == "request_cancelled"
    finally:
        emulator.configure(latency="0.2", concurrency=8)
        for b in bodies:
            fal.put(b["cancel_url"])


def test_cancel_after_completion_is_400_already_completed(fal: httpx.Client, inputs: dict[str, str]) -> None:
    body = submit(fal, {"video_url": inputs["video_3s"], "audio_url": inputs["audio_3s"]}).json()
    wait_done(fal, body["status_url"])
    answer = fal.put(body["cancel_url"])
    assert answer.status_code == 400 and answer.json()["status"] == "ALREADY_COMPLETED"


def test_max_queue_length_and_request_timeout_are_honoured(
    fal: httpx.Client, emulator: EmulatorProcess, inputs: dict[str, str]
) -> None:
    idle(emulator)
    emulator.configure(latency="3", concurrency=1)
    pair = {"video_url": inputs["video_3s"], "audio_url": inputs["audio_3s"]}
    try:
        running = submit(fal, pair).json()
        queued = fal.post(f"/{APP}", json=pair, headers={"X-Fal-Request-Timeout": "1"}).json()
        full = submit(fal, pair, fal_max_queue_length="1")
        assert full.status_code == 429 and "retry-after" in full.headers
        timed_out = wait_done(fal, queued["status_url"], timeout=10)
        assert timed_out["error_type"] == "request_timeout"
    finally:
        emulator.configure(latency="0.2", concurrency=8)
        fal.put(running["cancel_url"])


def test_unreachable_and_non_media_inputs_fail_the_request_like_the_model(
    fal: httpx.Client, inputs: dict[str, str]
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/nothing.mp4"
    text = "data:video/mp4;base64," + base64.b64encode(b"not a video at all" * 10).decode()
    for video in (dead, text):
        body = submit(fal, {"video_url": video, "audio_url": inputs["audio_3s"]}).json()
        done = wait_done(fal, body["status_url"])
        assert done["error"] and done["error_type"] == "bad_input"
        result = fal.get(body["response_url"])
        assert result.status_code == 422
        assert result.json()["detail"][0]["loc"] == ["body", "video_url"]


# media ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", list(SyncMode))
@pytest.mark.parametrize(("video", "audio"), [("video_3s", "audio_5s"), ("video_5s", "audio_3s")])
def test_each_sync_mode_gives_the_table_length(
    fal: httpx.Client, inputs: dict[str, str], tmp_path: Path, mode: SyncMode, video: str, audio: str
) -> None:
    body = submit(fal, {"video_url": inputs[video], "audio_url": inputs[audio], "sync_mode": mode.value}).json()
    done = wait_done(fal, body["status_url"])
    assert "error" not in done, done
    output = tmp_path / "out.mp4"
    output.write_bytes(fal.get(fal.get(body["response_url"]).json()["video"]["url"]).content)
    found = probe(str(output))
    expected = output_duration(mode, float(video[6]), float(audio[6]))
    assert abs(found.duration - expected) <= FRAME, (mode, found)
    assert found.video_codec == "h264" and found.audio_codec == "aac"


def test_options_sync_mode_overrides_the_top_level_one(
    fal: httpx.Client, inputs: dict[str, str], tmp_path: Path
) -> None:
    pair = {"video_url": inputs["video_3s"], "audio_url": inputs["audio_5s"]}
    body = submit(fal, {**pair, "sync_mode": "cut_off", "options": {"sync_mode": "loop"}}).json()
    wait_done(fal, body["status_url"])
    output = tmp_path / "out.mp4"
    output.write_bytes(fal.get(fal.get(body["response_url"]).json()["video"]["url"]).content)
    assert abs(probe(str(output)).duration - 5.0) <= FRAME


def test_copy_media_mode_keeps_the_length(
    fal: httpx.Client, emulator: EmulatorProcess, inputs: dict[str, str], tmp_path: Path
) -> None:
    emulator.configure(media_mode="copy")
    try:
        body = submit(fal, {"video_url": inputs["video_5s"], "audio_url": inputs["audio_3s"]}).json()
        assert "error" not in wait_done(fal, body["status_url"])
    finally:
        emulator.configure(media_mode="encode")
    output = tmp_path / "out.mp4"
    output.write_bytes(fal.get(fal.get(body["response_url"]).json()["video"]["url"]).content)
    assert abs(probe(str(output)).duration - 3.0) <= 2 * FRAME


# faults ----------------------------------------------------------------------------------------
def test_each_fault_can_be_switched_on_and_shows_as_fal_would(
    fal: httpx.Client, emulator: EmulatorProcess, inputs: dict[str, str]
) -> None:
    pair = {"video_url": inputs["video_3s"], "audio_url": inputs["audio_3s"]}
    emulator.set_faults(rate_limit="once")
    limited = submit(fal, pair)
    assert limited.status_code == 429 and float(limited.headers["retry-after"]) > 0

    emulator.set_faults(ingress_5xx="once")
    ingress = submit(fal, pair)
    assert ingress.status_code in (502, 503, 504)
    assert "nginx" in ingress.text and "x-fal-request-id" not in ingress.headers

    emulator.set_faults(runner_5xx="once")
    runner = submit(fal, pair)
    assert runner.status_code >= 500 and "x-fal-request-id" in runner.headers
    assert runner.headers["x-fal-error-type"]

    created_before = emulator.counters()["created"]
    emulator.set_faults(drop_submit="once")
    with pytest.raises(httpx.TransportError):
        submit(fal, pair)
    assert emulator.counters()["created"] == created_before + 1  # created, but the answer was lost

    emulator.set_faults(model_error="once")
    body = submit(fal, pair).json()
    failed = wait_done(fal, body["status_url"])
    assert failed["error"] and failed["error_type"] in ("runner_disconnected", "request_timeout", "internal_error")
    assert fal.get(body["response_url"]).status_code >= 500

    emulator.set_faults(validation_after="once")
    body = submit(fal, pair).json()
    assert wait_done(fal, body["status_url"])["error_type"] == "bad_input"
    assert fal.get(body["response_url"]).status_code == 422

    emulator.set_faults(expire_result="once")
    body = submit(fal, pair).json()
    assert wait_done(fal, body["status_url"])["status"] == "COMPLETED"
    assert fal.get(body["response_url"]).status_code == 404

    emulator.set_faults(cdn_404="once")
    body = submit(fal, pair).json()
    wait_done(fal, body["status_url"])
    url = fal.get(body["response_url"]).json()["video"]["url"]
    assert httpx.get(url).status_code == 404

    emulator.configure(hang_seconds=1.5)
    emulator.set_faults(hang="once")
    started = time.monotonic()
    assert submit(fal, pair).status_code == 200
    assert time.monotonic() - started >= 1.4
    emulator.configure(hang_seconds=60)

    emulator.set_faults(error_on_result_only="once")
    body = submit(fal, pair).json()
    quiet = wait_done(fal, body["status_url"])
    assert quiet["status"] == "COMPLETED" and "error" not in quiet  # the status says nothing
    answer = fal.get(body["response_url"])
    assert answer.status_code >= 500 and answer.json()["detail"]  # the result fetch tells

    emulator.set_faults(wrong_file_size="once")
    body = submit(fal, pair).json()
    wait_done(fal, body["status_url"])
    video = fal.get(body["response_url"]).json()["video"]
    assert video["file_size"] != len(httpx.get(video["url"]).content)

    injected = emulator.counters()["faults_injected"]
    for name in ("rate_limit", "ingress_5xx", "runner_5xx", "drop_submit", "model_error", "validation_after",
                 "expire_result", "cdn_404", "hang", "error_on_result_only", "wrong_file_size"):  # fmt: skip
        assert injected.get(name, 0) >= 1, name


def wait_gone(fal: httpx.Client, url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if fal.get(url).status_code == 404:
                return
        except httpx.RemoteProtocolError:
            pass  # removed while it was being served (the lifetime ended mid-download): ask again
        assert time.monotonic() < deadline, f"{url} was still served after {timeout} s"
        time.sleep(0.1)


def test_retention_follows_the_size_of_the_json_result_not_of_the_video(
    fal: httpx.Client, emulator: EmulatorProcess, inputs: dict[str, str]
) -> None:
    """The 10 KB rule is about the result document; a multi-KB mp4 behind a small JSON is kept 1 h."""
    emulator.configure(retention=3600, retention_large=1)
    try:
        body = submit(fal, {"video_url": inputs["video_5s"], "audio_url": inputs["audio_5s"]}).json()
        wait_done(fal, body["status_url"])
        result = fal.get(body["response_url"])
        assert result.json()["video"]["file_size"] > 10 * 1024 and len(result.content) < 10 * 1024
        record = emulator.inspect(body["request_id"])
        assert record["result_bytes"] == len(json.dumps(result.json()).encode())
        assert record["keep_result_s"] == 3600  # the small-result retention, not retention_large
        emulator.configure(retention=1)
        wait_gone(fal, body["response_url"])
        assert fal.get(body["status_url"]).status_code == 404
    finally:
        emulator.configure(retention=3600, retention_large=360)


def test_counters_count_requests_per_marker(
    fal: httpx.Client, emulator: EmulatorProcess, inputs: dict[str, str]
) -> None:
    pair = {"video_url": inputs["video_3s"], "audio_url": inputs["audio_3s"]}
    for _ in range(2):
        fal.post(f"/{APP}", json=pair, headers={"X-Lipsync-Job-Id": "job-counted-twice"})
    assert emulator.counters()["by_marker"]["job-counted-twice"] == 2


# webhooks ------------------------------------------------------------------------------------
@dataclass
class Hook:
    url: str
    received: list[tuple[float, dict[str, str], bytes]]

    def wait_for(self, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            assert time.monotonic() < deadline, f"{len(self.received)} deliveries of {count}"
            time.sleep(0.05)


@contextlib.contextmanager
def hook_server(answers: Callable[[int], int]) -> Iterator[Hook]:
    """A webhook receiver on a free port; `answers(n)` is the status for the n-th delivery (from 1)."""
    import threading

    import uvicorn

    received: list[tuple[float, dict[str, str], bytes]] = []

    async def hook(request: Request) -> Response:
        received.append((time.monotonic(), dict(request.headers), await request.body()))
        return Response(status_code=answers(len(received)))

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(Starlette(routes=[Route("/hook", hook, methods=["POST"])]), port=port, log_level="error")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for_port(port)
    try:
        yield Hook(f"http://127.0.0.1:{port}/hook", received)
    finally:
        server.should_exit = True
        thread.join(5)


def test_webhook_is_signed_as_fal_signs_and_retried_until_accepted(
    fal: httpx.Client, emulator: EmulatorProcess, inputs: dict[str, str]
) -> None:
    with hook_server(lambda n: 503 if n == 1 else 200) as hook:
        body = submit(
            fal, {"video_url": inputs["video_3s"], "audio_url": inputs["audio_3s"]}, fal_webhook=hook.url
        ).json()
        hook.wait_for(2)
        received = [(headers, raw) for _, headers, raw in hook.received]
    assert len(received) == 2, "a refused delivery is retried"
    headers, raw = received[-1]
    payload = json.loads(raw)
    assert payload["request_id"] == body["request_id"] and payload["status"] == "OK"
    assert payload["payload"]["video"]["url"] and payload["error"] is None
    jwks = fal.get("/.well-known/jwks.json").json()["keys"][0]
    public = Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(jwks["x"] + "=" * (-len(jwks["x"]) % 4)))
    message = "\n".join([
        headers["x-fal-webhook-request-id"], headers["x-fal-webhook-user-id"],
        headers["x-fal-webhook-timestamp"], hashlib.sha256(raw).hexdigest(),
    ]).encode()  # fmt: skip
    public.verify(bytes.fromhex(headers["x-fal-webhook-signature"]), message)  # raises if forged
    assert abs(int(headers["x-fal-webhook-timestamp"]) - time.time()) < 120


def test_webhook_retries_follow_fals_schedule_ten_attempts_over_two_hours(
    fal: httpx.Client, emulator: EmulatorProcess, inputs: dict[str, str]
) -> None:
    gaps = retry_gaps()
    assert len(gaps) == 9 and sum(gaps) == pytest.approx(2 * 3600)  # 10 attempts in 2 h
    assert all(later > earlier for earlier, later in itertools.pairwise(gaps))
    ended = emulator.counters()["webhooks_ended"]
    with hook_server(lambda n: 503) as hook:
        submit(fal, {"video_url": inputs["video_3s"], "audio_url": inputs["audio_3s"]}, fal_webhook=hook.url)
        hook.wait_for(10)
        deadline = time.monotonic() + 30
        while emulator.counters()["webhooks_ended"] == ended:  # fal gave up after the 10th
            assert time.monotonic() < deadline
            time.sleep(0.05)
        times = [at for at, _, _ in hook.received]
    assert len(times) == 10, "ten attempts, then no more"
    scaled = retry_gaps(0.001)
    for (earlier, later), gap in zip(itertools.pairwise(times), scaled, strict=True):
        assert later - earlier >= gap * 0.9, (later - earlier, gap)


def test_webhook_carries_payload_error_when_the_payload_could_not_be_delivered(
    fal: httpx.Client, emulator: EmulatorProcess, inputs: dict[str, str]
) -> None:
    emulator.set_faults(webhook_payload_error="once")
    with hook_server(lambda n: 200) as hook:
        body = submit(
            fal, {"video_url": inputs["video_3s"], "audio_url": inputs["audio_3s"]}, fal_webhook=hook.url
        ).json()
        hook.wait_for(1)
    delivered = json.loads(hook.received[0][2])
    assert delivered["request_id"] == body["request_id"] and delivered["gateway_request_id"] == body["request_id"]
    assert delivered["payload"] is None and delivered["payload_error"]
    assert fal.get(body["response_url"]).json()["video"]["url"]  # the result itself is still there


# fal's platform headers and hosts ------------------------------------------------------------------
def fal_client(base: str, headers: FalHeaders | None = None, fallback: str = "") -> FalQueueClient:
    return FalQueueClient(
        queue_url=base, app=APP, key=SecretStr("emulator-test-key"), platform_headers=headers,
        fallback_queue_url=fallback,
    )  # fmt: skip


def test_platform_headers_are_sent_and_honoured(
    fal: httpx.Client, emulator: EmulatorProcess, inputs: dict[str, str]
) -> None:
    pair = {"video_url": inputs["video_3s"], "audio_url": inputs["audio_3s"]}
    settings_headers = FalHeaders(start_timeout_s=600, store_io=False, output_lifecycle_s=1)
    client = fal_client(emulator.url, settings_headers)
    idle(emulator)
    emulator.configure(latency="2", concurrency=1)
    try:
        running = client.submit(pair, marker="hdr-running")
        low = client.submit(pair, marker="hdr-low", priority=FalPriority.low)
        normal = client.submit(pair, marker="hdr-normal")
        assert normal.queue_position == 0, "a normal request goes ahead of a waiting low one"
        record = emulator.inspect(low.request_id)
        assert record["priority"] == "low" and record["start_timeout"] == 600
        assert record["store_io"] is False and record["cdn_ttl"] == 1
        assert record["headers"]["x-fal-store-io"] == "0"
        assert json.loads(record["headers"]["x-fal-object-lifecycle-preference"]) == {"expiration_duration_seconds": 1}
        assert emulator.inspect(normal.request_id)["priority"] == "normal"
    finally:
        emulator.configure(latency="0.2", concurrency=8)
    wait_done(fal, running.status_url)
    video_url = fal.get(running.response_url).json()["video"]["url"]
    wait_gone(fal, video_url)  # fal's copy of the output lives only as long as asked
    assert fal.get(running.response_url).status_code == 200  # the result document stays
    for request in (low, normal):
        wait_done(fal, request.status_url)
    client.close()


def test_submit_moves_to_the_fallback_host_only_when_the_first_cannot_be_reached(
    emulator: EmulatorProcess, inputs: dict[str, str]
) -> None:
    pair = {"video_url": inputs["video_3s"], "audio_url": inputs["audio_3s"]}
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RetryableError):
        fal_client(dead).submit(pair, marker="no-fallback")
    created = emulator.counters()["created"]
    request = fal_client(dead, fallback=emulator.url).submit(pair, marker="fallback")
    assert request.status_url.startswith(emulator.url) and request.gateway_request_id == request.request_id
    assert emulator.counters()["created"] == created + 1
    # An answer lost after the POST reached fal may have created a request: never sent again elsewhere.
    emulator.set_faults(drop_submit="once")
    with pytest.raises(SubmitOutcomeUnknown):
        fal_client(emulator.url, fallback=emulator.url.replace("127.0.0.1", "localhost")).submit(pair, marker="lost")
    assert emulator.counters()["by_marker"]["lost"] == 1


# the published schema, strictly -----------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [{"model_mode": "emotion", "prompt": "happy"}, {"model_mode": "talking_head", "prompt": "neutral"},
     {"model_mode": "lipsync", "active_speaker_detection": {"bounding_boxes": [[0, 0, 10, 10]]}}],
)  # fmt: skip
def test_published_values_are_accepted(fal: httpx.Client, inputs: dict[str, str], options: dict[str, Any]) -> None:
    answer = submit(fal, {"video_url": inputs["video_3s"], "audio_url": inputs["audio_3s"], "options": options})
    assert answer.status_code == 200, answer.text
    assert wait_done(fal, answer.json()["status_url"]).get("error") is None


@pytest.mark.parametrize(
    ("options", "loc"),
    [
        ({"prompt": "make it smile"}, ["body", "options", "prompt"]),
        ({"model_mode": "mouth"}, ["body", "options", "model_mode"]),
        ({"active_speaker_detection": {"bounding_boxes": [[0.5, 0, 10, 10]]}},
         ["body", "options", "active_speaker_detection", "bounding_boxes", 0, 0]),
        ({"active_speaker_detection": {"bounding_boxes": [None]}},
         ["body", "options", "active_speaker_detection", "bounding_boxes", 0]),
    ],
)  # fmt: skip
def test_values_outside_the_published_schema_are_422_in_fals_shape(
    fal: httpx.Client, options: dict[str, Any], loc: list[Any]
) -> None:
    answer = submit(fal, {"video_url": "x", "audio_url": "y", "options": options})
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["loc"] == loc


# the official client and scale ------------------------------------------------------------------
FAL_CLIENT_SCRIPT = """
import json, sys, fal_client
pair = json.loads(sys.stdin.read())
app = "fal-ai/sync-lipsync/v3"
handle = fal_client.submit(app, arguments=pair)
status = fal_client.status(app, handle.request_id, with_logs=True)
result = handle.get()
assert fal_client.result(app, handle.request_id) == result
assert isinstance(fal_client.status(app, handle.request_id), fal_client.Completed)
events = []
subscribed = fal_client.subscribe(app, arguments=pair, with_logs=True, on_queue_update=events.append)
slow = fal_client.submit(app, arguments=pair)
fal_client.cancel(app, slow.request_id)
print(json.dumps({"first": result, "subscribed": subscribed, "status": type(status).__name__,
                  "events": [type(e).__name__ for e in events]}))
"""


def test_official_fal_client_runs_submit_status_result_cancel_subscribe_over_tls(
    inputs: dict[str, str], tmp_path: Path
) -> None:
    server = start_emulator("--latency", "1", "--concurrency", "1", tls=True)
    try:
        assert server.cert_path is not None
        env = {
            **os.environ, "FAL_KEY": "emulator-test-key", "FAL_QUEUE_RUN_HOST": f"127.0.0.1:{server.port}",
            "SSL_CERT_FILE": str(server.cert_path),
        }  # fmt: skip
        pair = json.dumps({"video_url": inputs["video_3s"], "audio_url": inputs["audio_5s"], "sync_mode": "loop"})
        run = subprocess.run([sys.executable, "-c", FAL_CLIENT_SCRIPT], input=pair, env=env, capture_output=True,
                             text=True, timeout=120)  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
        answer = json.loads(run.stdout)
        assert answer["first"]["video"]["url"].startswith("https://127.0.0.1:")
        assert answer["subscribed"]["video"]["file_size"] > 0
        assert "Completed" in answer["events"] and answer["events"][-1] == "Completed"
        assert server.counters()["cancels"] == 1
    finally:
        server.stop()


def test_a_thousand_requests_at_zero_latency_are_all_served(tmp_path: Path) -> None:
    from lipsync.samples import make_audio, make_video

    video = make_video(str(tmp_path / "tiny.mp4"), 1.0, width=64, height=48)
    audio = make_audio(str(tmp_path / "tiny.wav"), 1.0, sample_rate=8000)
    server = start_emulator("--latency", "0", "--concurrency", "1000", "--media-mode", "copy")
    pair = {"video_url": data_uri(video, "video/mp4"), "audio_url": data_uri(audio, "audio/wav")}
    try:
        with httpx.Client(base_url=server.url, headers=KEY, timeout=120,
                          limits=httpx.Limits(max_connections=32)) as http:  # fmt: skip
            started = time.perf_counter()
            with ThreadPoolExecutor(16) as pool:
                answers = list(pool.map(lambda _: http.post(f"/{APP}", json=pair), range(1000)))
            submitted = time.perf_counter() - started
            assert all(a.status_code == 200 for a in answers)
            ids = [a.json()["request_id"] for a in answers]
            deadline = time.monotonic() + 240
            while server.counters()["completed"] + server.counters()["failed"] < 1000:
                assert time.monotonic() < deadline, server.counters()
                time.sleep(0.5)
            elapsed = time.perf_counter() - started
            counters = server.counters()
            assert counters["completed"] == 1000 and counters["failed"] == 0
            with ThreadPoolExecutor(16) as pool:
                results = list(pool.map(lambda i: http.get(f"/fal-ai/sync-lipsync/requests/{i}"), ids))
            assert all(r.status_code == 200 for r in results)
        print(f"\nemulator: 1000 submits in {submitted:.2f} s ({submitted:.2f} ms each), "
              f"all 1000 completed (copy mode) in {elapsed:.2f} s ({elapsed:.1f} ms per request)")  # fmt: skip
    finally:
        server.stop()
