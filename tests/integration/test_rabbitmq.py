"""RabbitMQ as the broker, end to end: the job store stays in Redis, the messages go through
quorum queues in a vhost of this test's own, real workers carry a batch to completion."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from config.broker import broker_options
from lipsync.models import SyncMode
from tests.conftest import Workers
from tests.fixtures.cli import lipsync
from tests.fixtures.isolated import settings_from
from tests.fixtures.rabbitmq import private_vhost, queue_types

PREFIX = "rabbit"


@pytest.fixture(scope="module")
def rabbit_env(stack_env: dict[str, str]) -> Iterator[dict[str, str]]:
    # Its own key prefix: the session's Redis-broker workers must not dispatch these jobs.
    with private_vhost() as url:
        # JSON logs here, so the batch below also checks that every worker line is one JSON object.
        yield {**stack_env, "LIPSYNC_BROKER_URL": url, "LIPSYNC_KEY_PREFIX": PREFIX, "LIPSYNC_LOG_JSON": "true"}


@pytest.fixture(scope="module")
def rabbit_workers(rabbit_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:
    running = Workers(rabbit_env, tmp_path_factory.mktemp("rabbit-worker-logs"))
    running.start_all()
    yield running
    running.stop_all()


def test_amqp_urls_choose_rabbitmq_with_quorum_queues_and_publisher_confirms(rabbit_env: dict[str, str]) -> None:
    options = broker_options(settings_from(rabbit_env))
    assert "broker_transport" not in options  # not the Redis transport, whatever the URL said before
    assert options["broker_transport_options"]["confirm_publish"] is True
    assert {queue.name: queue.queue_arguments for queue in options["task_queues"]} == {
        "transfer": {"x-queue-type": "quorum"},
        "api": {"x-queue-type": "quorum"},
    }
    redis = broker_options(settings_from({**rabbit_env, "LIPSYNC_BROKER_URL": rabbit_env["LIPSYNC_REDIS_URL"]}))
    assert redis["broker_transport"] == "workers.broker:Transport"


def test_rabbitmq_carries_a_batch_to_completion(
    rabbit_env: dict[str, str], rabbit_workers: Workers, media: dict[str, str], tmp_path: Path, emulator: object
) -> None:
    shutil.copy(media["video_3s"], tmp_path / "clip.mp4")
    shutil.copy(media["audio_5s"], tmp_path / "dub.wav")
    modes = [mode.value for mode in SyncMode] * 2
    manifest = tmp_path / "batch.jsonl"
    manifest.write_text(
        "".join(json.dumps({"video": "clip.mp4", "audio": "dub.wav", "sync_mode": m}) + "\n" for m in modes)
    )

    result = lipsync(rabbit_env, "batch", str(manifest), "--json", "--timeout", "240", cwd=tmp_path, timeout=300)

    assert result.returncode == 0, result.stderr[-3000:] + rabbit_workers.logs()[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert [r["status"] for r in records] == ["completed"] * len(modes)
    # Output lengths as each sync_mode gives for a 3 s video and 5 s audio.
    lengths = {"cut_off": 3, "loop": 5, "bounce": 5, "silence": 5, "remap": 5}
    assert [round(r["output"]["duration"]) for r in records] == [lengths[m] for m in modes]
    by_job = emulator.counters()["by_marker"]  # type: ignore[attr-defined]
    assert [by_job.get(r["id"]) for r in records] == [1] * len(modes)  # one fal request each, none paid twice
    vhost = rabbit_env["LIPSYNC_BROKER_URL"].rsplit("/", 1)[1]
    types = queue_types(vhost)
    assert types.get("transfer") == "quorum" and types.get("api") == "quorum", types
    assert "Unrecoverable error" not in rabbit_workers.logs()


def test_worker_logs_in_json_mode_are_json_and_celerys_task_lines_name_the_job(
    rabbit_env: dict[str, str], rabbit_workers: Workers, client: object
) -> None:
    lines = [line for line in rabbit_workers.logs().splitlines() if line.strip()]
    not_json = [line for line in lines if not line.startswith("{")]
    assert not_json == [], not_json[:5]  # no banner, no bare warnings
    entries = [json.loads(line) for line in lines]
    received = [e for e in entries if e["logger"] == "celery.worker.strategy" and e["message"].endswith("received")]
    succeeded = [e for e in entries if e["logger"] == "celery.app.trace" and "succeeded" in e["message"]]
    assert received and succeeded, lines[:20]
    assert all(len(e.get("job_id", "")) == 32 for e in received + succeeded), (received + succeeded)[:3]
