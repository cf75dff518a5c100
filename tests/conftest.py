"""Session-wide real services: redis-server, moto's S3 server, the fal emulator, and real
`celery worker` processes, all on free ports and stopped at the end."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from producers.devstack import DEFAULT_WORKERS, WorkerSpec, spawn_worker, stop_process

TEST_FAL_KEY = "test-fal-key-3f9c1b7e"
BUCKET = "lipsync-test"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[object]:
    from tests.fixtures.services import start_redis

    with start_redis() as server:
        yield server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[object]:
    from tests.fixtures.services import start_s3

    with start_s3() as server:
        yield server


# The session emulator's fal latency; a test that changes it puts this back.
EMULATOR_LATENCY = "0.3"


@pytest.fixture(scope="session")
def emulator() -> Iterator[object]:
    from tests.fixtures.emulator import start_emulator

    server = start_emulator("--latency", EMULATOR_LATENCY, "--concurrency", "8")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def stack_env(redis_server: object, s3_server: object, emulator: object) -> Iterator[dict[str, str]]:
    """The environment every process of the test stack shares; also applied to this one."""
    env = {
        **s3_server.env(),  # type: ignore[attr-defined]
        "LIPSYNC_S3_BUCKET": BUCKET,
        "LIPSYNC_REDIS_URL": redis_server.url,  # type: ignore[attr-defined]
        "LIPSYNC_BROKER_URL": redis_server.url,  # type: ignore[attr-defined]
        "LIPSYNC_FAL_QUEUE_URL": emulator.url,  # type: ignore[attr-defined]
        "FAL_KEY": TEST_FAL_KEY,
        "LIPSYNC_ALLOW_PRIVATE_URLS": "127.0.0.1,localhost",
        "LIPSYNC_POLL_INITIAL_S": "0.3",
        "LIPSYNC_POLL_MAX_S": "2",
        "LIPSYNC_RETRY_BASE_S": "0.3",
        "LIPSYNC_RETRY_MAX_S": "3",
        "LIPSYNC_POLL_LEASE_S": "15",
        "LIPSYNC_TRANSFER_LEASE_S": "30",
        "LIPSYNC_DISPATCH_INTERVAL_S": "0.1",
        "LIPSYNC_SUBMITS_PER_SECOND": "200",
        # Every task in Flower from the workers' start (test_operations, test_secrets read them there).
        "LIPSYNC_TASK_EVENTS": "1",
    }
    saved = dict(os.environ)
    os.environ.update(env)
    from config.settings import get_settings

    get_settings.cache_clear()
    from lipsync.storage import Storage

    Storage(get_settings()).ensure_bucket()
    yield env
    os.environ.clear()
    os.environ.update(saved)
    get_settings.cache_clear()


class Workers:
    """Real `celery worker` processes, one per queue; tests may kill and restart them."""

    def __init__(self, env: dict[str, str], logdir: Path) -> None:
        self.env = env
        self.logdir = logdir
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, spec: WorkerSpec) -> subprocess.Popen[bytes]:
        log = (self.logdir / f"worker-{spec.name}.log").open("ab")
        process = spawn_worker(spec, self.env, log=log)
        self.processes[spec.name] = process
        return process

    def start_all(self) -> None:
        for spec in DEFAULT_WORKERS:
            self.start(spec)

    def stop_all(self) -> None:
        for process in self.processes.values():
            stop_process(process, timeout=20)
        self.processes.clear()

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.logdir.glob("worker-*.log")))


@pytest.fixture(scope="session")
def workers(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:
    running = Workers(stack_env, tmp_path_factory.mktemp("worker-logs"))
    running.start_all()
    yield running
    running.stop_all()


@pytest.fixture(scope="session")
def client(stack_env: dict[str, str]) -> Iterator[object]:
    from config.settings import Settings
    from producers.api import LipsyncClient

    lipsync = LipsyncClient(Settings())
    yield lipsync
    lipsync.close()


@pytest.fixture(scope="session")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Generated sample media: videos and speech-like audio of known lengths."""
    from lipsync.samples import make_audio, make_video

    folder = tmp_path_factory.mktemp("media")
    return {
        "video_3s": make_video(str(folder / "video-3s.mp4"), 3.0),
        "video_5s": make_video(str(folder / "video-5s.mp4"), 5.0),
        "audio_3s": make_audio(str(folder / "audio-3s.wav"), 3.0),
        "audio_5s": make_audio(str(folder / "audio-5s.wav"), 5.0),
        "video_2s_with_audio": make_video(str(folder / "talk-2s.mp4"), 2.0, with_audio=True),
    }
