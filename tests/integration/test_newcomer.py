"""A newcomer's first hour: help that helps, and nothing left behind in the temp folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from producers.devstack import free_port, wait_for_port
from tests.fixtures.cli import lipsync


def test_lipsync_emulator_help_shows_the_emulators_flags() -> None:
    result = lipsync({}, "emulator", "--help", timeout=60)
    assert result.returncode == 0, result.stderr
    for flag in ("--latency", "--concurrency", "--fault", "--retention"):
        assert flag in result.stdout, result.stdout


def test_the_emulator_stopped_with_sigterm_removes_its_temp_folder(tmp_path: Path) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "emulator", "--port", str(port)],
        env={**os.environ, "TMPDIR": str(temp)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, timeout=60, process=process)
        assert [p.name for p in temp.iterdir() if p.name.startswith("fal-emulator-")]  # it made one
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    deadline = time.monotonic() + 5
    while list(temp.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(temp.iterdir()) == []
