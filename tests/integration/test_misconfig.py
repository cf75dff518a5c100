"""Misconfiguration is said in one line, before a job is taken or a cent is spent."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from producers.devstack import free_port
from tests.fixtures.cli import lipsync


def _start_worker(env: dict[str, str], tmp_path: Path) -> tuple[subprocess.Popen[str], Path]:
    log = tmp_path / "worker.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", "api", "-P", "threads", "-c", "1",
         "-l", "INFO", "--without-mingle", "--without-gossip",
         "--hostname", f"misconfigured-{secrets.token_hex(3)}@%h"],
        env={**os.environ, **env, "LIPSYNC_METRICS_PORT": str(free_port())},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    return process, log


def _exit_status(process: subprocess.Popen[str], timeout: float = 60) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return process.returncode
        time.sleep(0.1)
    process.kill()
    process.wait(10)
    return None


def test_a_worker_without_fal_key_against_the_real_fal_refuses_to_start(
    stack_env: dict[str, str], tmp_path: Path
) -> None:
    # The real fal's URL is never called: the worker stops before it takes a job.
    env = {**stack_env, "FAL_KEY": "", "LIPSYNC_FAL_QUEUE_URL": "https://queue.fal.run"}
    process, log = _start_worker(env, tmp_path)
    assert _exit_status(process) == 78, log.read_text()
    output = log.read_text()
    lines = [line for line in output.splitlines() if "cannot start" in line]
    assert len(lines) == 1 and "FAL_KEY is not set" in lines[0], output
    assert "Traceback" not in output


def test_a_worker_whose_bucket_does_not_exist_names_it_in_one_line(stack_env: dict[str, str], tmp_path: Path) -> None:
    bucket = f"no-such-bucket-{secrets.token_hex(4)}"
    process, log = _start_worker({**stack_env, "LIPSYNC_S3_BUCKET": bucket}, tmp_path)
    assert _exit_status(process) == 78, log.read_text()
    output = log.read_text()
    lines = [line for line in output.splitlines() if "cannot start" in line]
    assert len(lines) == 1 and f"the bucket '{bucket}' does not exist" in lines[0], output
    assert "Traceback" not in output


def test_a_worker_against_the_emulator_needs_no_fal_key(stack_env: dict[str, str], tmp_path: Path) -> None:
    process, log = _start_worker({**stack_env, "FAL_KEY": ""}, tmp_path)
    try:
        deadline = time.monotonic() + 60
        while "ready." not in log.read_text() and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()
            time.sleep(0.1)
        assert "ready." in log.read_text()
    finally:
        process.terminate()
        process.wait(30)


def test_submit_to_a_missing_bucket_names_it_in_one_line(stack_env: dict[str, str], media: dict[str, str]) -> None:
    bucket = f"no-such-bucket-{secrets.token_hex(4)}"
    result = lipsync({**stack_env, "LIPSYNC_S3_BUCKET": bucket}, "submit", "--video", media["video_3s"],
                     "--audio", media["audio_3s"])  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"the bucket '{bucket}' does not exist" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_submit_with_the_broker_down_records_the_job_and_says_it_will_run(
    stack_env: dict[str, str], media: dict[str, str], client: object
) -> None:
    # The job store is up, the broker is not: the job exists, and the user is told not to resubmit.
    env = {**stack_env, "LIPSYNC_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    result = lipsync(env, "submit", "--video", media["video_3s"], "--audio", media["audio_3s"])
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    assert "broker is unreachable" in result.stderr and job_id in result.stderr, result.stderr
    assert "do not submit it again" in result.stderr and "Traceback" not in result.stderr
    store = client.store  # type: ignore[attr-defined]
    assert store.get(job_id).status.value == "queued"
    assert store.scheduled_at(job_id) is not None  # the dispatcher sends it when it comes due


def test_a_broker_url_of_another_kind_is_one_line(stack_env: dict[str, str]) -> None:
    result = lipsync({**stack_env, "LIPSYNC_BROKER_URL": "sqs://queue"}, "status", "any-job")
    assert result.returncode == 2, result.stderr
    assert "LIPSYNC_BROKER_URL='sqs://queue' is not valid: expected redis://, rediss://, sentinel:// or amqp://" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args",
    [("status", "abc"), ("jobs",), ("wait", "abcdef"), ("cancel", "abc"), ("retry", "abc"), ("stats",),
     ("tenants", "list"), ("batch", "manifest.jsonl")],
)  # fmt: skip
def test_every_command_with_redis_down_says_so_in_one_line(args: tuple[str, ...], tmp_path: Path) -> None:
    (tmp_path / "manifest.jsonl").write_text(
        '{"video": "https://example.com/a.mp4", "audio": "https://example.com/a.wav"}\n'
    )
    down = f"redis://127.0.0.1:{free_port()}/0"
    # COLUMNS as a narrow terminal's: the error must still be one line.
    s3_down = f"http://127.0.0.1:{free_port()}"
    env = {"LIPSYNC_REDIS_URL": down, "LIPSYNC_BROKER_URL": down, "LIPSYNC_S3_ENDPOINT_URL": s3_down, "COLUMNS": "60"}
    env |= {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    result = lipsync(env, *args, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot reach Redis" in lines[0], result.stderr
