"""A bad `LIPSYNC_*` value is one line naming the variable, the value and what is expected (exit 2),
whichever way the pipeline is started: any `lipsync` command, a Celery worker, the Python API."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from config.settings import ConfigError, get_settings

# (variable, value, words of what is expected)
BAD_VALUES = [
    ("LIPSYNC_MAX_IN_FLIGHT", "x", "expected a whole number"),
    ("LIPSYNC_POLL_MAX_S", "-1", "expected a number greater than 0"),
    ("LIPSYNC_POLL_INITIAL_S", "60", "expected at most LIPSYNC_POLL_MAX_S (30), the backoff's cap"),
    ("LIPSYNC_BROKER_URL", "nonsense://", "expected redis://, rediss://, sentinel:// or amqp://"),
    ("LIPSYNC_LOG_JSON", "maybe", "expected true or false"),
    ("LIPSYNC_TENANT_WEIGHTS", "{not json", "expected JSON"),
    ("LIPSYNC_FAL_QUEUE_PRIORITY", "urgent", "expected 'normal' or 'low'"),
]

COMMANDS = [
    ("submit", "--video", "v.mp4", "--audio", "a.wav"),
    ("status", "abc"),
    ("jobs",),
    ("wait", "abc"),
    ("batch", "manifest.jsonl"),
    ("stats",),
    ("tenants", "list"),
    ("worker", "-Q", "api"),
    ("serve", "--port", "1"),
    ("flower",),
    ("demo", "--out", "demo-out"),
    ("dev", "up", "--dir", "dev"),
]


def _clean_env(tmp_path: Path, **bad: str) -> dict[str, str]:
    # Nothing but the bad value from LIPSYNC_*: the runner's own settings must not mask it.
    env = {name: value for name, value in os.environ.items() if not name.startswith("LIPSYNC_")}
    return {**env, "HOME": str(tmp_path), "COLUMNS": "60", **bad}  # a narrow terminal: still one line


def _assert_one_line(result: subprocess.CompletedProcess[str], *words: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def _lipsync(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # `lipsync` as installed, with no inherited environment (tests.fixtures.cli merges os.environ).
    return subprocess.run(
        [sys.executable, "-m", "producers.cli", *args], env=env, capture_output=True, text=True, timeout=120, cwd=cwd
    )


@pytest.mark.parametrize("args", COMMANDS, ids=lambda args: "-".join(args[:2]))
def test_every_command_names_a_bad_value_in_one_line(args: tuple[str, ...], tmp_path: Path) -> None:
    (tmp_path / "manifest.jsonl").write_text('{"video": "v.mp4", "audio": "a.wav"}\n')
    result = _lipsync(_clean_env(tmp_path, LIPSYNC_MAX_IN_FLIGHT="x"), *args, cwd=tmp_path)
    _assert_one_line(result, "LIPSYNC_MAX_IN_FLIGHT='x'", "expected a whole number")
    # Said before anything started: no dev stack recorded, no demo output.
    assert not (tmp_path / "dev").exists() and not (tmp_path / "demo-out").exists()


@pytest.mark.parametrize(("name", "value", "expected"), BAD_VALUES, ids=[bad[0] for bad in BAD_VALUES])
def test_each_kind_of_bad_value_is_named_with_what_is_expected(
    name: str, value: str, expected: str, tmp_path: Path
) -> None:
    result = _lipsync(_clean_env(tmp_path, **{name: value}), "status", "abc", cwd=tmp_path)
    _assert_one_line(result, f"{name}={value!r}", expected)


def test_several_bad_values_are_all_named_in_the_one_line(tmp_path: Path) -> None:
    env = _clean_env(tmp_path, LIPSYNC_MAX_IN_FLIGHT="x", LIPSYNC_POLL_LEASE_S="0", LIPSYNC_METRICS_PORT="70000")
    result = _lipsync(env, "jobs", cwd=tmp_path)
    _assert_one_line(result, "LIPSYNC_MAX_IN_FLIGHT='x'", "LIPSYNC_POLL_LEASE_S='0'", "LIPSYNC_METRICS_PORT='70000'")


@pytest.mark.parametrize(
    ("name", "value"), [("LIPSYNC_POLL_MAX_S", "-1"), ("LIPSYNC_BROKER_URL", "nonsense://")], ids=["poll", "broker"]
)
def test_a_celery_worker_with_a_bad_value_stops_in_one_line(name: str, value: str, tmp_path: Path) -> None:
    # `celery -A workers.app worker`, as a deployment that does not go through `lipsync worker` runs it.
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", "api", "-P", "threads", "-c", "1",
         "--without-mingle", "--without-gossip"],
        env=_clean_env(tmp_path, **{name: value}),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    _assert_one_line(result, "cannot start", f"{name}={value!r}", "expected")


def test_the_python_api_raises_one_error_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from producers.api import LipsyncClient

    monkeypatch.setenv("LIPSYNC_REDIS_URL", "http://user:hunter2@127.0.0.1:6379/0")
    get_settings.cache_clear()
    try:
        with pytest.raises(ConfigError) as caught:
            LipsyncClient()
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    message = str(caught.value)
    assert message.startswith("LIPSYNC_REDIS_URL='http://user:***@127.0.0.1:6379/0' is not valid"), message
    assert "expected redis://" in message and "hunter2" not in message and "\n" not in message


def test_a_secret_is_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    from config.settings import Settings

    with pytest.raises(ConfigError) as caught:
        Settings(fal_key={"not": "a string"}, flower_basic_auth=["x"])  # type: ignore[arg-type]
    assert "FAL_KEY=(hidden)" in str(caught.value) and "LIPSYNC_FLOWER_BASIC_AUTH=(hidden)" in str(caught.value)
