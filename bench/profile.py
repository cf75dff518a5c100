"""Where worker time goes: py-spy samples the worker processes (and their prefork children)
during a run; samples are then attributed to the library at the innermost frame that belongs
to a known component (Celery, kombu, Redis client, boto3, httpx, PyAV, pydantic, logging...)."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

from bench.stack import Workers

# py-spy names files relative to their sys.path entry: "kombu/messaging.py", "workers/stage.py".
_COMPONENTS = (
    ("lipsync.probe / PyAV", ("av/", "lipsync/probe.py", "emulator/media.py")),
    ("hashing", ("hashlib", "workers/transit.py")),
    ("boto3 / botocore (S3)", ("botocore/", "boto3/", "s3transfer/", "urllib3/", "lipsync/storage.py")),
    ("httpx (fal, fetch)", ("httpx/", "httpcore/", "h11/", "lipsync/fetcher.py", "lipsync/fal.py")),
    ("redis client", ("redis/",)),
    ("kombu (broker)", ("kombu/",)),
    ("celery", ("celery/", "billiard/", "vine/")),
    ("pydantic", ("pydantic/", "pydantic_core/", "lipsync/models.py")),
    ("prometheus metrics", ("prometheus_client/", "lipsync/metrics.py")),
    ("json", ("json/",)),
    ("logging", ("logging/", "config/logging.py")),
    ("ssl / socket", ("ssl.py", "socket.py", "selectors.py")),
    (
        "job store / runner / poller",
        ("lipsync/jobstore.py", "lipsync/admission.py", "lipsync/poller.py", "lipsync/jobs.py", "workers/"),
    ),
)
_FRAME = re.compile(r"\(([^()]*):\d+\)$")
# Generic frames (a socket read, json) count for whoever called them, when a caller is known.
_GENERIC = frozenset({"json", "ssl / socket"})


def _matches(path: str, needle: str) -> bool:
    return path.startswith(needle) or f"/{needle}" in path


def component(stack: str) -> str:
    """The component a sampled stack (`frame (file:line);...`) is attributed to: the innermost
    known library, else the innermost generic one."""
    paths = []
    for frame in reversed(stack.split(";")):
        match = _FRAME.search(frame.strip())
        if match:
            paths.append(match.group(1))
    for generic in (False, True):
        for path in paths:
            for name, needles in _COMPONENTS:
                if (name in _GENERIC) == generic and any(_matches(path, needle) for needle in needles):
                    return name
    return "other (interpreter, stdlib)"


def attribute(raw: str) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack or not number.isdigit():
            continue
        counts[component(stack)] += int(number)
    return dict(counts.most_common())


class PySpy:
    """`py-spy record --subprocesses --gil` on each worker of a run, stopped with SIGINT at its end.
    `--gil` keeps only the thread holding the GIL: threads waiting for it are not work."""

    def __init__(self, folder: Path, rate: int = 50) -> None:
        self.folder = folder
        self.rate = rate
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.outputs: dict[str, Path] = {}

    def attach(self, workers: Workers) -> PySpy:
        binary = shutil.which("py-spy") or str(Path(__import__("sys").executable).parent / "py-spy")
        self.folder.mkdir(parents=True, exist_ok=True)
        for name, pid in workers.pids().items():
            out = self.folder / f"{name}.txt"
            self.outputs[name] = out
            self.processes[name] = subprocess.Popen(
                [binary, "record", "--pid", str(pid), "--subprocesses", "--gil", "--format", "raw",
                 "--rate", str(self.rate), "--nonblocking", "--output", str(out)],
                stdout=subprocess.DEVNULL, stderr=(self.folder / f"{name}.log").open("ab"),
            )  # fmt: skip
        return self

    def close(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process in self.processes.values():
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()

    def result(self) -> dict[str, Any]:
        found: dict[str, Any] = {"rate_hz": self.rate}
        for name, path in self.outputs.items():
            if not path.exists():
                found[name] = {"error": "py-spy wrote nothing (ptrace not permitted?)"}
                continue
            counts = attribute(path.read_text(errors="replace"))
            total = sum(counts.values()) or 1
            found[name] = {
                "samples": total,
                "share": {key: round(value / total, 3) for key, value in counts.items()},
            }
        return found
