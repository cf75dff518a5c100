"""`lipsync stats`: what the last N minutes looked like, read from the job store.

Throughput, latency percentiles (end to end and per stage), failures by cause and estimated
spend, over the jobs that ended in the window (the store keeps a time index of ended jobs).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Group
from rich.table import Table

from lipsync.account import read_state
from lipsync.jobstore import JobStore
from lipsync.models import PRICE_PER_SECOND_USD, Job, JobStatus

# Spans shown as latency rows: (name, from status, to status).
SPANS = (
    ("end to end", "queued", "completed"),
    ("staging", "staging", "submitting"),
    ("submit", "submitting", "submitted"),
    ("at fal", "submitted", "storing"),
    ("fal queue wait", "submitted", "in_progress"),
    ("storing", "storing", "completed"),
)
PERCENTILES = (50, 90, 99)


@dataclass
class Latency:
    count: int
    percentiles: dict[str, float]
    max: float


@dataclass
class Failure:
    code: str
    count: int
    example: str


@dataclass
class Stats:
    minutes: float
    ended: int
    completed: int
    failed: int
    cancelled: int
    completed_per_minute: float
    output_seconds: float
    output_seconds_per_minute: float
    spend_usd: float
    price_per_output_second_usd: float
    latency: dict[str, Latency] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    now: dict[str, int] = field(default_factory=dict)
    # "waiting on the fal account (...)" while fal refuses submits (lipsync/account.py), else None.
    waiting_on: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile: a value that was actually seen."""
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def latency_of(values: list[float]) -> Latency | None:
    if not values:
        return None
    values.sort()
    return Latency(
        count=len(values),
        percentiles={f"p{p}": round(percentile(values, p), 3) for p in PERCENTILES},
        max=round(values[-1], 3),
    )


def ended_at(job: Job) -> float:
    return job.timestamps.get(job.status.value, job.updated_at)


def compute_stats(
    store: JobStore, minutes: float, now: float | None = None, price_per_output_second_usd: float = PRICE_PER_SECOND_USD
) -> Stats:
    now = time.time() if now is None else now
    since = now - minutes * 60
    jobs = [job for job in store.get_many(store.finished_ids(since)) if job.terminal and ended_at(job) >= since]
    by_status = Counter(job.status for job in jobs)
    completed = [job for job in jobs if job.status is JobStatus.completed]
    output_seconds = sum(job.output.duration or 0.0 for job in completed if job.output is not None)
    spans: dict[str, list[float]] = {name: [] for name, _, _ in SPANS}
    for job in completed:
        stamps = {**job.timestamps, "queued": job.created_at}
        for name, start, end in SPANS:
            if start in stamps and end in stamps and stamps[end] >= stamps[start]:
                spans[name].append(stamps[end] - stamps[start])
    failures: dict[str, Failure] = {}
    for job in jobs:
        if job.status is JobStatus.failed and job.error is not None:
            failure = failures.setdefault(job.error.code, Failure(job.error.code, 0, job.error.message))
            failure.count += 1
    window = max(minutes, 1e-9)
    return Stats(
        minutes=minutes,
        ended=len(jobs),
        completed=len(completed),
        failed=by_status[JobStatus.failed],
        cancelled=by_status[JobStatus.cancelled],
        completed_per_minute=round(len(completed) / window, 3),
        output_seconds=round(output_seconds, 3),
        output_seconds_per_minute=round(output_seconds / window, 3),
        spend_usd=round(sum(job.cost_estimate_usd or 0.0 for job in completed), 4),
        price_per_output_second_usd=price_per_output_second_usd,
        latency={name: span for name, values in spans.items() if (span := latency_of(values)) is not None},
        failures=sorted(failures.values(), key=lambda failure: -failure.count),
        now={status: count for status, count in store.counts().items() if count},
        waiting_on=account.waiting_on if (account := read_state(store.redis, store.keys)) else None,
    )


def render_stats(stats: Stats) -> Group:
    headline = Table(title=f"last {stats.minutes:g} minutes", show_header=False, box=None)
    headline.add_row("jobs ended", f"{stats.ended}  (completed {stats.completed}, failed {stats.failed}, "
                     f"cancelled {stats.cancelled})")  # fmt: skip
    headline.add_row("throughput", f"{stats.completed_per_minute:.2f} jobs/min, "
                     f"{stats.output_seconds_per_minute:.1f} s of output/min")  # fmt: skip
    headline.add_row("output", f"{stats.output_seconds:.1f} s of video")
    per_job = stats.spend_usd / stats.completed if stats.completed else 0.0
    price = stats.price_per_output_second_usd
    headline.add_row(
        "estimated spend",
        f"${stats.spend_usd:.2f} (${per_job:.3f} a completed job at ${price:.4f} per output second)",
    )
    headline.add_row("all jobs now", " ".join(f"{status}:{count}" for status, count in stats.now.items()) or "none")
    if stats.waiting_on:
        headline.add_row("paused", f"[yellow]submits wait on {stats.waiting_on}[/yellow]")
    parts: list[Any] = [headline]
    if stats.latency:
        latency = Table(title="latency of completed jobs, s")
        latency.add_column("span")
        latency.add_column("jobs", justify="right")
        for p in PERCENTILES:
            latency.add_column(f"p{p}", justify="right")
        latency.add_column("max", justify="right")
        for name, found in stats.latency.items():
            latency.add_row(
                name,
                str(found.count),
                *(f"{found.percentiles[f'p{p}']:.2f}" for p in PERCENTILES),
                f"{found.max:.2f}",
            )
        parts.append(latency)
    if stats.failures:
        failures = Table(title="failures by cause")
        failures.add_column("code")
        failures.add_column("jobs", justify="right")
        failures.add_column("for example")
        for failure in stats.failures:
            failures.add_row(failure.code, str(failure.count), failure.example)
        parts.append(failures)
    return Group(*parts)
