"""`lipsync dev up` then `lipsync submit`: commands adopt a running dev stack unless told otherwise."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from producers.devenv import _CHOSEN, DevProcess, DevState, adopt_running_stack, dead_processes, process_start_time


def write_state(home: Path, pid: int, started: str) -> None:
    DevState(
        env={"LIPSYNC_REDIS_URL": "redis://127.0.0.1:1/0", "LIPSYNC_S3_BUCKET": "lipsync-local"},
        processes=[DevProcess("redis", pid, started)],
    ).save(home)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*_CHOSEN, "LIPSYNC_S3_BUCKET"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.usefixtures("clean_env")
def test_a_running_dev_stack_is_adopted_when_nothing_else_was_chosen(tmp_path: Path) -> None:
    write_state(tmp_path, os.getpid(), process_start_time(os.getpid()))
    assert adopt_running_stack(tmp_path) is not None
    assert os.environ["LIPSYNC_REDIS_URL"] == "redis://127.0.0.1:1/0"


@pytest.mark.usefixtures("clean_env")
def test_a_chosen_service_wins_over_the_dev_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_state(tmp_path, os.getpid(), process_start_time(os.getpid()))
    monkeypatch.setenv("LIPSYNC_FAL_QUEUE_URL", "https://queue.fal.run")
    assert adopt_running_stack(tmp_path) is None
    assert "LIPSYNC_REDIS_URL" not in os.environ


@pytest.mark.usefixtures("clean_env")
def test_a_stack_that_died_or_a_broken_state_file_is_ignored(tmp_path: Path) -> None:
    write_state(tmp_path, os.getpid(), "not-its-start-time")
    assert adopt_running_stack(tmp_path) is None
    (tmp_path / "state.json").write_text("{not json")
    assert adopt_running_stack(tmp_path) is None
    assert adopt_running_stack(tmp_path / "missing") is None
    assert "LIPSYNC_REDIS_URL" not in os.environ


@pytest.mark.usefixtures("clean_env")
def test_the_python_api_finds_the_dev_stack_as_the_cli_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from config.settings import get_settings
    from producers.api import LipsyncClient

    monkeypatch.chdir(tmp_path)
    write_state(tmp_path / ".lipsync" / "dev", os.getpid(), process_start_time(os.getpid()))
    get_settings.cache_clear()
    try:
        client = LipsyncClient()  # connects lazily: no Redis needed to read its settings
        assert client.settings.redis_url == "redis://127.0.0.1:1/0"
        assert client.settings.s3_bucket == "lipsync-local"
        client.close()
    finally:
        for name in ("LIPSYNC_REDIS_URL", "LIPSYNC_S3_BUCKET"):
            os.environ.pop(name, None)
        get_settings.cache_clear()


def test_a_stack_with_a_dead_process_is_reported_by_name(tmp_path: Path) -> None:
    DevState(
        env={},
        processes=[DevProcess("redis", os.getpid(), process_start_time(os.getpid())), DevProcess("worker-api", 1, "x")],
    ).save(tmp_path)
    assert dead_processes(tmp_path) == ["worker-api"]
    assert dead_processes(tmp_path / "missing") == []
