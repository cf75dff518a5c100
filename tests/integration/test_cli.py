"""The `lipsync` command line as a user types it, against the real stack and real workers."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.cli import lipsync

pytestmark = pytest.mark.usefixtures("workers")


def test_batch_manifest_submits_good_lines_reports_bad_ones_and_summarises(
    stack_env: dict[str, str], media: dict[str, str], tmp_path: Path
) -> None:
    folder = tmp_path / "pairs"
    folder.mkdir()
    shutil.copy(media["video_3s"], folder / "clip.mp4")
    shutil.copy(media["audio_5s"], folder / "dub ünïcode.wav")
    manifest = folder / "batch.jsonl"
    lines = [
        {"video": "clip.mp4", "audio": "dub ünïcode.wav", "sync_mode": "loop", "metadata": {"ad": "17"}},
        {"video": "clip.mp4", "audio": "dub ünïcode.wav", "sync_mode": "cut_off"},
        {"video": "clip.mp4", "audio": "missing.wav"},
        {"video": "clip.mp4", "audio": "dub ünïcode.wav", "sync_mode": "stretch"},
    ]
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    result = lipsync(stack_env, "batch", str(manifest), "--json", "--timeout", "150", cwd=tmp_path)
    assert result.returncode == 1, result.stderr  # two lines were refused
    assert "line 3:" in result.stderr and "does not exist" in result.stderr
    assert "line 4:" in result.stderr and "sync_mode" in result.stderr
    assert "2 jobs submitted" in result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert [r["status"] for r in records] == ["completed", "completed"]
    assert [round(r["output"]["duration"]) for r in records] == [5, 3]
    assert records[0]["metadata"] == {"ad": "17"} and records[0]["batch_id"] == records[1]["batch_id"]

    table = lipsync(stack_env, "jobs", "--batch", records[0]["batch_id"])
    assert table.returncode == 0 and "loop" in table.stdout and "cut_off" in table.stdout


def test_status_wait_cancel_retry_speak_in_words(stack_env: dict[str, str], media: dict[str, str]) -> None:
    submitted = lipsync(stack_env, "submit", "--video", media["video_3s"], "--audio", media["audio_3s"])
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    waited = lipsync(stack_env, "wait", job_id, "--json", "--timeout", "120")
    assert waited.returncode == 0, waited.stderr
    assert json.loads(waited.stdout)["status"] == "completed"
    status = lipsync(stack_env, "status", job_id)
    assert status.returncode == 0 and "completed" in status.stdout and "outputs/" in status.stdout

    for args, words in [
        (("cancel", job_id), "already completed; nothing to cancel"),
        (("retry", job_id), "only failed or cancelled jobs can be retried"),
        (("status", "no-such-job"), "no job with id 'no-such-job'"),
        (("submit", "--video", media["video_3s"], "--audio", media["audio_3s"], "--options", "{bad"), "not valid JSON"),
        (("submit", "--video", "ftp://example.com/a.mp4", "--audio", media["audio_3s"]), "scheme 'ftp'"),
    ]:
        result = lipsync(stack_env, *args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert words in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_lipsync_worker_starts_a_celery_worker_for_its_queue(stack_env: dict[str, str], tmp_path: Path) -> None:
    log = (tmp_path / "worker.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "producers.cli", "worker", "-Q", "api", "-c", "1", "--without-mingle"],
        env={**os.environ, **stack_env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        text = ""
        while "ready." not in text and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
            text = (tmp_path / "worker.log").read_text(errors="replace")
        assert "ready." in text, text[-2000:]
        assert "lipsync.store" in text and "lipsync.submit" in text  # the tasks it knows
        assert ".> api" in text  # the queue it consumes
        # Its own node name, not celery@host: a second worker on this host would not clash.
        assert re.search(r"api-[0-9a-f]{6}@", text) and "celery@" not in text, text[:2000]
    finally:
        process.terminate()
        process.wait(30)
    assert process.returncode == 0


def test_celery_flower_command_refuses_to_run_without_auth(stack_env: dict[str, str]) -> None:
    env: dict[str, Any] = {**stack_env, "LIPSYNC_FLOWER_BASIC_AUTH": ""}
    result = lipsync(env, "flower", timeout=60)
    assert result.returncode != 0 and "LIPSYNC_FLOWER_BASIC_AUTH" in result.stderr


def test_prefixes_full_ids_in_pipes_and_a_timeout_said_in_words(
    stack_env: dict[str, str], media: dict[str, str]
) -> None:
    timed_out = lipsync(
        stack_env, "submit", "--video", media["video_3s"], "--audio", media["audio_3s"], "--wait", "--timeout", "0.2"
    )
    assert timed_out.returncode == 3, timed_out.stderr
    assert "timed out after 0.2 s" in timed_out.stderr and "lipsync wait" in timed_out.stderr
    job_id = timed_out.stderr.split("job ", 1)[1].split()[0]
    assert len(job_id) == 32

    waited = lipsync(stack_env, "wait", job_id[:12], "--timeout", "120", "--json")
    assert waited.returncode == 0 and json.loads(waited.stdout)["id"] == job_id, waited.stderr
    status = lipsync(stack_env, "status", job_id[:12], "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["id"] == job_id, status.stderr

    narrow = {**stack_env, "COLUMNS": "80"}  # what rich assumes in a pipe
    listed = lipsync(narrow, "jobs", "--limit", "5")
    assert listed.returncode == 0, listed.stderr
    assert job_id in listed.stdout and "completed" in listed.stdout, listed.stdout
