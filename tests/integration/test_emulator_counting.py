"""The emulator counts what fal would bill, whoever sends it: the ground truth of the "paid once" checks."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from emulator.control import EmulatorProcess
from tests.fixtures.emulator import start_emulator

APP = "fal-ai/sync-lipsync/v3"


@pytest.fixture
def fal() -> Iterator[EmulatorProcess]:
    server = start_emulator("--latency", "0", "--concurrency", "4")
    yield server
    server.stop()


def post(server: EmulatorProcess, body: bytes) -> httpx.Response:
    # No X-Lipsync-Job-Id: a client that leaves our header out must still be counted.
    headers = {"Authorization": "Key test", "Content-Type": "application/json"}
    return httpx.post(f"{server.url}/{APP}", content=body, headers=headers, timeout=10)


def test_the_same_input_sent_twice_is_counted_twice_by_input_whatever_its_signature_and_key_order(
    fal: EmulatorProcess,
) -> None:
    first = post(
        fal, b'{"video_url": "http://127.0.0.1:9/v.mp4?X-Amz-Signature=aa", "audio_url": "http://127.0.0.1:9/a.wav"}'
    )
    again = post(
        fal,
        b'{"audio_url": "http://127.0.0.1:9/a.wav?sig=2",  "video_url": "http://127.0.0.1:9/v.mp4?X-Amz-Signature=bb"}',
    )
    other = post(
        fal, b'{"video_url": "http://127.0.0.1:9/v.mp4", "audio_url": "http://127.0.0.1:9/a.wav", "sync_mode": "loop"}'
    )
    assert first.status_code == again.status_code == other.status_code == 200
    counters = fal.counters()
    assert counters["created"] == 3 and counters["by_marker"] == {}
    assert sorted(counters["by_input"].values()) == [1, 2]
    listed = fal.requests()
    assert [r["id"] for r in listed] == [
        first.json()["request_id"],
        again.json()["request_id"],
        other.json()["request_id"],
    ]
    assert all(r["marker"] is None for r in listed)
    assert listed[0]["input_key"] == listed[1]["input_key"] != listed[2]["input_key"]
    assert fal.inspect(first.json()["request_id"])["created_for_input"] == 2


def test_runner_5xx_created_makes_the_request_and_answers_503_with_its_id(fal: EmulatorProcess) -> None:
    fal.set_faults(runner_5xx_created="once")
    answer = post(fal, b'{"video_url": "http://127.0.0.1:9/v.mp4", "audio_url": "http://127.0.0.1:9/a.wav"}')
    assert answer.status_code == 503
    request_id = answer.headers["x-fal-request-id"]
    assert fal.inspect(request_id)["id"] == request_id  # it exists: fal will run it and bill it
    assert fal.counters()["created"] == 1
    assert [r["id"] for r in fal.requests()] == [request_id]


def test_runner_5xx_creates_nothing(fal: EmulatorProcess) -> None:
    fal.set_faults(runner_5xx="once")
    answer = post(fal, b'{"video_url": "http://127.0.0.1:9/v.mp4", "audio_url": "http://127.0.0.1:9/a.wav"}')
    assert answer.status_code == 503 and "x-fal-request-id" in answer.headers
    assert fal.counters()["created"] == 0 and fal.requests() == []
