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


def test_dev_up_on_a_stack_with_a_dead_process_repairs_it_and_says_so(tmp_path: Path) -> None:
    from producers.devenv import DevState

    home = tmp_path / "dev"
    up = lipsync({}, "dev", "up", "--dir", str(home), "--latency", "0.3", cwd=tmp_path, timeout=120)
    assert up.returncode == 0, up.stderr
    try:
        state = DevState.load(home)
        assert state is not None
        worker = next(process for process in state.processes if process.name == "worker-api")
        os.killpg(worker.pid, signal.SIGKILL)  # as the OOM killer would
        deadline = time.monotonic() + 10
        while worker.alive and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lipsync({}, "dev", "status", "--dir", str(home), cwd=tmp_path).returncode == 1

        again = lipsync({}, "dev", "up", "--dir", str(home), "--latency", "0.3", cwd=tmp_path, timeout=120)
        assert again.returncode == 0, again.stderr
        assert "had lost worker-api" in again.stderr and "already running" not in again.stderr, again.stderr
        assert lipsync({}, "dev", "status", "--dir", str(home), cwd=tmp_path).returncode == 0
    finally:
        lipsync({}, "dev", "down", "--dir", str(home), cwd=tmp_path)
