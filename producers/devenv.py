"""`lipsync dev up | down | status | env`: the local stack kept running in the background.

`up` starts what `lipsync demo` starts (Redis, the S3 server, the fal emulator, one worker per
queue, Flower), records each process in `.lipsync/dev/state.json`, and prints the environment
as `export` lines, so `eval "$(lipsync dev up)"` lets `lipsync submit` work by hand. `down`
stops exactly the processes it recorded — checked by start time, so a recycled pid is left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from producers.devstack import start_stack

DEFAULT_DIR = Path(".lipsync") / "dev"


@dataclass
class DevProcess:
    name: str
    pid: int
    started: str  # /proc start time, to tell our process from a later one with the same pid

    @property
    def alive(self) -> bool:
        return process_start_time(self.pid) == self.started


@dataclass
class DevState:
    env: dict[str, str]
    processes: list[DevProcess] = field(default_factory=list)
    flower_url: str | None = None
    emulator_url: str | None = None
    metrics_urls: list[str] = field(default_factory=list)
    logdir: str = ""
    redis_dir: str = ""
    started_at: float = 0.0

    @classmethod
    def load(cls, home: Path) -> DevState | None:
        path = home / "state.json"
        if not path.exists():
            return None
        document: dict[str, Any] = json.loads(path.read_text())
        document["processes"] = [DevProcess(**entry) for entry in document.get("processes", [])]
        return cls(**document)

    def save(self, home: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        path = home / "state.json"
        path.write_text(json.dumps(asdict(self), indent=2))
        path.chmod(0o600)  # holds Flower's password

    @property
    def running(self) -> list[DevProcess]:
        return [process for process in self.processes if process.alive]


def process_start_time(pid: int) -> str:
    """The kernel's start time of `pid` ("" if there is no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return ""
    except OSError:  # no /proc (macOS): fall back to "a process with this pid exists"
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return ""
        return "?"
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # a zombie has ended; only its parent has not noticed yet
        return ""
    return fields[19]


# Set any of these and you have chosen your own services: the dev stack is not used.
_CHOSEN = ("LIPSYNC_REDIS_URL", "LIPSYNC_BROKER_URL", "LIPSYNC_FAL_QUEUE_URL", "LIPSYNC_S3_ENDPOINT_URL")


def adopt_running_stack(home: Path = DEFAULT_DIR) -> DevState | None:
    """Point this process at a running `lipsync dev up` stack, unless the environment chose others.

    So `lipsync dev up` then `lipsync submit ...` just works, without `eval`.
    """
    if any(os.environ.get(name) for name in _CHOSEN):
        return None
    try:
        state = DevState.load(home)
    except (OSError, ValueError, TypeError):
        return None
    if state is None or not state.running:
        return None
    for name, value in state.env.items():
        os.environ.setdefault(name, value)
    return state


def dead_processes(home: Path = DEFAULT_DIR) -> list[str]:
    """The processes of the recorded stack that are gone (empty when there is no stack)."""
    try:
        state = DevState.load(home)
    except (OSError, ValueError, TypeError):
        return []
    return [process.name for process in state.processes if not process.alive] if state else []


def exports(env: dict[str, str]) -> str:
    return "\n".join(f"export {name}={shlex.quote(value)}" for name, value in sorted(env.items()))


def up(home: Path = DEFAULT_DIR, latency: str = "1-3") -> tuple[DevState, bool]:
    """Start the stack unless all of it runs already. Returns (state, started now).

    A stack with a dead process (a worker killed, Redis gone) is stopped and started anew, so
    `dev up` always leaves a whole stack: `dead_processes` tells which had gone."""
    state = DevState.load(home)
    if state is not None and state.processes and len(state.running) == len(state.processes):
        return state, False
    if state is not None:  # a stack that died, wholly or in part: stop what is left, start anew
        down(home)
    stack = start_stack(home / "logs", emulator_args=("--latency", latency), redis_dir=home / "redis")
    try:
        state = DevState(
            env=stack.env,
            processes=[
                DevProcess(name, process.pid, process_start_time(process.pid))
                for name, process in zip(stack.names, stack.processes, strict=True)
            ],
            flower_url=stack.flower_url,
            emulator_url=stack.emulator_url,
            metrics_urls=stack.metrics_urls,
            logdir=str(home / "logs"),
            redis_dir=str(home / "redis"),
            started_at=time.time(),
        )
        state.save(home)
    except BaseException:
        stack.stop()
        (home / "state.json").unlink(missing_ok=True)
        raise
    return state, True


def down(home: Path = DEFAULT_DIR, timeout: float = 20.0) -> list[str]:
    """Stop what `up` started, newest first; returns the names of the processes stopped."""
    state = DevState.load(home)
    if state is None:
        return []
    stopped = []
    for process in reversed(state.processes):
        if not process.alive:
            continue
        _signal_group(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while process.alive and time.monotonic() < deadline:
            time.sleep(0.1)
        _signal_group(process.pid, signal.SIGKILL)  # the group: a prefork pool goes with its parent
        stopped.append(process.name)
    if state.redis_dir:
        shutil.rmtree(state.redis_dir, ignore_errors=True)
    (home / "state.json").unlink(missing_ok=True)
    return stopped


def _signal_group(pid: int, signum: int) -> None:
    # Every process of the stack leads its own session (and so its group): see producers.devstack.
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:  # not a group leader after all: the process alone
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)
    except PermissionError:
        pass
