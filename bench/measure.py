"""What the benchmarks measure: CPU and memory of process trees (psutil), Redis commands (INFO
commandstats deltas), and the statistics every figure is reported with (median, min, max)."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil
import redis


def tree(pid: int) -> list[psutil.Process]:
    """A process and its live descendants (prefork children, threads are inside)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_cpu_seconds(pid: int, recursive: bool = True) -> float:
    """User + system CPU of a process tree, including children it has already reaped
    (Celery recycles prefork children, and a recycled child's time must not vanish)."""
    total = 0.0
    processes = tree(pid) if recursive else tree(pid)[:1]
    for index, process in enumerate(processes):
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
        if index == 0 and recursive:
            total += times.children_user + times.children_system
    return total


def tree_memory(pid: int) -> tuple[int, int, int]:
    """(sum of PSS over the tree, sum of RSS, largest single RSS), bytes. PSS splits the pages
    prefork children share with their parent, so the PSS sum is the tree's real footprint;
    the RSS sum counts shared pages once per process and is an upper bound."""
    pss, rss = [], []
    for process in tree(pid):
        try:
            full = process.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss.append(full.rss)
        pss.append(getattr(full, "pss", full.rss))
    return sum(pss), sum(rss), max(rss, default=0)


@dataclass
class CpuMeter:
    """CPU-seconds spent by named process trees between `start` and `stop`."""

    pids: Mapping[str, int]
    # Trees measured without their descendants (the bench process has the services as children).
    alone: frozenset[str] = frozenset({"bench"})
    before: dict[str, float] = field(default_factory=dict)
    spent: dict[str, float] = field(default_factory=dict)

    def _read(self) -> dict[str, float]:
        return {name: tree_cpu_seconds(pid, recursive=name not in self.alone) for name, pid in self.pids.items()}

    def start(self) -> CpuMeter:
        self.before = self._read()
        return self

    def stop(self) -> dict[str, float]:
        after = self._read()
        self.spent = {name: after[name] - self.before[name] for name in self.pids}
        return self.spent


@dataclass
class Sample:
    at: float
    values: dict[str, float]


class Sampler:
    """Samples named probes every `interval` seconds on a thread: RSS, CPU rate, queue depths."""

    def __init__(self, probes: Mapping[str, Any], interval: float = 0.5) -> None:
        self.probes = probes
        self.interval = interval
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            values: dict[str, float] = {}
            for name, probe in self.probes.items():
                try:
                    values.update({f"{name}.{k}": float(v) for k, v in probe().items()})
                except Exception:  # a process that just exited, an emulator busy: skip the point
                    continue
            self.samples.append(Sample(time.time(), values))
            self._stop.wait(self.interval)

    def series(self, name: str) -> list[tuple[float, float]]:
        return [(s.at, s.values[name]) for s in self.samples if name in s.values]

    def peak(self, name: str) -> float:
        return max((value for _, value in self.series(name)), default=0.0)


class RssProbe:
    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __call__(self) -> dict[str, float]:
        pss, rss, largest = tree_memory(self.pid)
        return {"pss": pss, "rss": rss, "rss_max_process": largest}


class CpuRateProbe:
    """CPU of a tree as a fraction of one core since the previous sample."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.last = (time.monotonic(), tree_cpu_seconds(pid))

    def __call__(self) -> dict[str, float]:
        now, cpu = time.monotonic(), tree_cpu_seconds(self.pid)
        then, before = self.last
        self.last = (now, cpu)
        return {"cpu": (cpu - before) / max(1e-6, now - then)}


def command_calls(client: redis.Redis[bytes]) -> dict[str, int]:
    """Calls per command since the server started (INFO commandstats; it also counts the
    commands that Lua scripts run, so one EVALSHA of a transition shows as several)."""
    stats = dict(client.info("commandstats"))
    return {name.removeprefix("cmdstat_"): int(entry["calls"]) for name, entry in stats.items()}


def command_delta(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    delta = {name: after.get(name, 0) - before.get(name, 0) for name in after}
    return {name: count for name, count in delta.items() if count > 0}


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def spread(values: Iterable[float]) -> dict[str, float]:
    """How every figure is reported: the median of the repeated runs, with min and max."""
    found = [float(v) for v in values]
    if not found:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "runs": 0}
    return {"median": statistics.median(found), "min": min(found), "max": max(found), "runs": len(found)}


def summarise(runs: Sequence[Mapping[str, Any]], keys: Iterable[str]) -> dict[str, dict[str, float]]:
    """For each numeric key of the per-run records, its spread over the runs."""
    return {key: spread(run[key] for run in runs if run.get(key) is not None) for key in keys}
