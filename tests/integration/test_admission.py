"""The global in-flight cap holds across worker processes, and every slot comes back.

A stack of its own next to the session's (its own Redis database for broker and job store, its
own key prefix), so that only these workers, with `LIPSYNC_MAX_IN_FLIGHT=3`, take its jobs:
two api worker processes share the cap. What is at fal is read at fal (the emulator's queued
and running requests), not from our own bookkeeping.
"""

from __future__ import annotations

import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lipsync.models import JobStatus
from producers.devstack import WorkerSpec
from tests.conftest import Workers
from tests.fixtures.isolated import settings_from

CAP = 3


class AtFal:
    """Samples how many requests fal holds (queued or running) and keeps the highest."""

    def __init__(self, emulator: Any) -> None:
        self.emulator = emulator
        self.highest = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> AtFal:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            counters = self.emulator.counters()
            self.highest = max(self.highest, counters["in_queue"] + counters["in_progress"])
            self._stop.wait(0.05)


@pytest.fixture
def capped(stack_env: dict[str, str], tmp_path: Path) -> Iterator[tuple[Any, Workers]]:
    parts = urllib.parse.urlsplit(stack_env["LIPSYNC_REDIS_URL"])
    own_db = urllib.parse.urlunsplit(parts._replace(path="/9"))
    env = {
        **stack_env,
        "LIPSYNC_REDIS_URL": own_db,
        "LIPSYNC_BROKER_URL": own_db,
        "LIPSYNC_KEY_PREFIX": "capped",
        "LIPSYNC_MAX_IN_FLIGHT": str(CAP),
    }
    from producers.api import LipsyncClient

    workers = Workers(env, tmp_path)
    specs = [
        WorkerSpec("transfer", "prefork", 2, "transfer"),
        WorkerSpec("api", "threads", 8, "api-one"),
        WorkerSpec("api", "threads", 8, "api-two"),
    ]
    for spec in specs:
        workers.start(spec)
    client = LipsyncClient(settings_from(env))
    try:
        deadline = time.monotonic() + 60
        while workers.logs().count(" ready.") < len(specs):
            assert time.monotonic() < deadline, "the capped workers did not start"
            time.sleep(0.2)
        yield client, workers
    finally:
        client.redis.flushdb()
        client.close()
        workers.stop_all()


def test_in_flight_cap_holds_across_two_worker_processes_and_every_slot_comes_back(
    capped: tuple[Any, Workers], media: dict[str, str], emulator: Any
) -> None:
    client, _ = capped
    emulator.configure(latency="1.5", concurrency=64)
    before = emulator.counters()
    try:
        with AtFal(emulator) as at_fal:
            jobs = [client.submit(media["video_3s"], media["audio_3s"]) for _ in range(12)]
            done = client.wait([job.id for job in jobs], timeout_s=180)
        assert {job.status for job in done} == {JobStatus.completed}, [job.error for job in done]
        assert at_fal.highest <= CAP, f"{at_fal.highest} requests at fal at once, over the cap of {CAP}"
        assert at_fal.highest >= 2, "the two api workers never had two requests at fal: the cap was not shared"
        # Every slot came back: a second round can again fill the whole cap at once
        # (fal takes long enough that all three are there together).
        emulator.configure(latency="6")
        with AtFal(emulator) as again:
            jobs = [client.submit(media["video_3s"], media["audio_3s"]) for _ in range(CAP)]
            done = client.wait([job.id for job in jobs], timeout_s=180)
        assert {job.status for job in done} == {JobStatus.completed}
        assert again.highest == CAP, f"only {again.highest} of {CAP} slots were free after the first round"
    finally:
        emulator.configure(latency="0.3", concurrency=8)
    assert emulator.created_since(before) == 12 + CAP
