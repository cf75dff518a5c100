"""Job metrics for Prometheus, derived in one place: the job store's transitions as a worker makes them.

Workers run under prefork, so values live in prometheus-client's multiprocess files: the worker's
main process prepares `PROMETHEUS_MULTIPROC_DIR` before it forks (`prepare_multiprocess_dir`) and
serves every child's values on `/metrics` (`serve`). Gauges of the whole system (jobs per status,
jobs at fal) are read from the job store at scrape time, so they are right whichever worker answers.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lipsync.account import read_state
from lipsync.errors import FalError, LipsyncError
from lipsync.fal import SubmitOutcomeUnknown
from lipsync.jobstore import JobStore
from lipsync.models import AT_FAL_STATUSES, JobStatus

log = logging.getLogger("lipsync.metrics")

# Seconds, from a fast poll to the 2 h job deadline.
_SECONDS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)


class JobMetrics:
    """The metrics themselves. Created on first use, after the worker set up its multiprocess dir."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # None: the default registry, the one multiprocess mode aggregates from the files.
        kwargs: dict[str, Any] = {} if registry is None else {"registry": registry}
        self.transitions = Counter(
            "lipsync_job_transitions", "Jobs entering each status (a worker's transitions)", ["status"], **kwargs
        )
        self.status_seconds = Histogram(
            "lipsync_status_seconds",
            "Time a job spent in a status before it left it (time in each stage)",
            ["status"],
            buckets=_SECONDS,
            **kwargs,
        )
        self.job_seconds = Histogram(
            "lipsync_job_seconds", "From creation to an end status", ["status"], buckets=_SECONDS, **kwargs
        )
        self.fal_queue_wait = Histogram(
            "lipsync_fal_queue_wait_seconds",
            "From submit until fal started the request (or finished it, if never seen in progress)",
            buckets=_SECONDS,
            **kwargs,
        )
        self.fal_inference = Histogram(
            "lipsync_fal_inference_seconds", "Inference time as fal reports it", buckets=_SECONDS, **kwargs
        )
        self.fal_errors = Counter(
            "lipsync_fal_errors", "Errors from fal, by stage and fal's error type", ["stage", "error_type"], **kwargs
        )
        self.stage_errors = Counter(
            "lipsync_stage_errors", "Errors raised by a stage, by code (retried or not)", ["stage", "code"], **kwargs
        )
        self.failures = Counter(
            "lipsync_job_failures", "Jobs failed, by error code and stage", ["code", "stage"], **kwargs
        )
        self.spend = Counter(
            "lipsync_estimated_spend_usd", "Estimated fal spend of completed jobs, USD (list price)", **kwargs
        )
        self.output_seconds = Counter("lipsync_output_seconds", "Seconds of lip-synced video stored", **kwargs)
        self.bytes = Counter(
            "lipsync_bytes", "Media bytes moved: 'in' fetched and staged, 'out' stored", ["direction"], **kwargs
        )
        self.media_cpu = Counter(
            "lipsync_media_cpu_seconds",
            "Worker CPU spent moving and probing media bytes (download, upload, probe; the thread's own "
            "CPU time): the rest of a worker's CPU is orchestration",
            ["work"],
            **kwargs,
        )


@cache
def job_metrics() -> JobMetrics:
    return JobMetrics()


@contextmanager
def media_work(work: str) -> Iterator[None]:
    """Count the CPU time the calling thread spends in the block as media work of kind `work`.

    The thread's own clock, so the other threads of a threads pool are not counted in. A large
    upload's parts, which s3transfer sends from threads of its own, are not counted here (they
    show as orchestration: the figure errs against us)."""
    started = time.thread_time()
    try:
        yield
    finally:
        _media_cpu(work).inc(time.thread_time() - started)


@cache
def _media_cpu(work: str) -> Any:
    return job_metrics().media_cpu.labels(work)  # looked up once per kind: seven uses a job


def observe_transition(
    store: JobStore,
    job_id: str,
    before: JobStatus | None,
    to: JobStatus | None,
    set_fields: Mapping[str, Any],
    now: float | None = None,
    known: Sequence[Any] | None = None,
) -> None:
    """Record what an applied transition says about the job; reads the timestamps it needs
    (unless the write already returned them as `known`: ts:<before>, ts:submitted, ts:queued, cost)."""
    if to is None or to is before:
        return
    now = time.time() if now is None else now
    metrics = job_metrics()
    metrics.transitions.labels(to.value).inc()
    if known is None:
        fields = [f"ts:{before.value if before else ''}", "ts:submitted", "ts:queued", "cost_estimate_usd"]
        known = store.redis.hmget(store.job_key(job_id), fields)
    entered, submitted, created, cost = known
    if before is not None and entered is not None:
        metrics.status_seconds.labels(before.value).observe(max(0.0, now - float(entered)))
    left_fal_queue = before in (JobStatus.submitted, JobStatus.in_queue) and to in (
        JobStatus.in_progress,
        JobStatus.storing,
    )
    if left_fal_queue and submitted is not None:
        metrics.fal_queue_wait.observe(max(0.0, now - float(submitted)))
    fal = set_fields.get("fal") or {}
    if to is JobStatus.storing and fal.get("inference_time") is not None:
        metrics.fal_inference.observe(float(fal["inference_time"]))
    if to is JobStatus.submitting:
        inputs = set_fields.get("inputs") or {}
        metrics.bytes.labels("in").inc(sum(int(media.get("size") or 0) for media in inputs.values()))
    if to.terminal and created is not None:
        metrics.job_seconds.labels(to.value).observe(max(0.0, now - float(created)))
    if to is JobStatus.completed:
        output = set_fields.get("output") or {}
        metrics.bytes.labels("out").inc(int(output.get("file_size") or 0))
        metrics.output_seconds.inc(float(output.get("duration") or 0.0))
        if cost is not None and cost != b"null":
            metrics.spend.inc(float(cost))
    if to is JobStatus.failed:
        error = set_fields.get("error") or {}
        metrics.failures.labels(str(error.get("code", "unknown")), str(error.get("stage") or "")).inc()


def observe_error(stage: str, exc: BaseException) -> None:
    """Count an error a stage raised; fal's own errors also by fal's error type."""
    code = exc.code if isinstance(exc, LipsyncError) else "internal_error"
    metrics = job_metrics()
    metrics.stage_errors.labels(stage, code).inc()
    if isinstance(exc, FalError | SubmitOutcomeUnknown) or code.startswith("fal_"):
        error_type = getattr(exc, "error_type", None) or code
        metrics.fal_errors.labels(stage, str(error_type)).inc()


class JobStoreCollector(Collector):
    """System-wide gauges read from the job store at scrape time (correct under any number of workers)."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def describe(self) -> list[Metric]:
        return []  # no Redis round trip at registration

    def collect(self) -> Iterator[Metric]:
        try:
            counts = self.store.counts()
            scheduled = self.store.schedule_size()
            overdue = int(self.store.redis.zcount(self.store.schedule_key, "-inf", time.time() - 5))
            paused = read_state(self.store.redis, self.store.keys)
        except Exception as exc:  # Redis away: the rest of /metrics still answers
            log.warning("metrics: cannot read the job store: %s: %s", type(exc).__name__, exc)
            return
        jobs = GaugeMetricFamily("lipsync_jobs", "Jobs in each status now (job store)", labels=["status"])
        for status, count in counts.items():
            jobs.add_metric([status], count)
        yield jobs
        at_fal = sum(counts[status.value] for status in AT_FAL_STATUSES)
        yield GaugeMetricFamily("lipsync_jobs_at_fal", "Jobs in flight at fal now (job store)", value=at_fal)
        yield GaugeMetricFamily("lipsync_schedule_size", "Entries in the durable schedule", value=scheduled)
        yield GaugeMetricFamily(
            "lipsync_fal_account_paused",
            "1 while submits wait on the fal account (locked, or the key refused); 0 while fal accepts them",
            value=0 if paused is None else 1,
        )
        yield GaugeMetricFamily(
            "lipsync_schedule_overdue", "Schedule entries due for more than 5 s (dispatch lag)", value=overdue
        )


def multiprocess_dir(port: int, configured: str = "") -> Path:
    return Path(configured or Path(tempfile.gettempdir()) / f"lipsync-metrics-{port}")


def prepare_multiprocess_dir(path: Path) -> None:
    """Point prometheus-client at `path` (empty: values of an earlier run would add up) before forking."""
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink(missing_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    if "prometheus_client.values" in sys.modules:
        # prometheus-client picks its value class at import; no metric exists yet, so switch it now.
        from prometheus_client import values

        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


def serve(store: JobStore, port: int, address: str = "127.0.0.1", multiprocess_path: Path | None = None) -> None:
    """Serve /metrics from this process: every process's job metrics plus the job-store gauges.

    The multiprocess dir is wiped only once the port is ours, so a second worker started on
    the same port by mistake cannot erase the first one's values.
    """
    registry = CollectorRegistry()
    if multiprocess_path is not None:
        multiprocess_path.mkdir(parents=True, exist_ok=True)
        multiprocess.MultiProcessCollector(registry, path=str(multiprocess_path))  # type: ignore[no-untyped-call]
    registry.register(JobStoreCollector(store))
    start_http_server(port, addr=address, registry=registry)
    if multiprocess_path is not None:
        prepare_multiprocess_dir(multiprocess_path)


# The gateway's HTTP requests (`lipsync serve`): counts and latency per route template, never per
# raw path, so job ids do not become series.
class RequestMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        kwargs: dict[str, Any] = {} if registry is None else {"registry": registry}
        self.requests = Counter(
            "lipsync_gateway_requests", "HTTP requests answered by the gateway", ["method", "route", "status"], **kwargs
        )
        self.seconds = Histogram(
            "lipsync_gateway_request_seconds",
            "Time to answer an HTTP request",
            ["method", "route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            **kwargs,
        )


@cache
def request_metrics() -> RequestMetrics:
    return RequestMetrics()


class ObserveRequests:
    """ASGI middleware: each HTTP request counted and timed by its route template.

    Plain ASGI rather than `app.middleware("http")`: Starlette's BaseHTTPMiddleware wraps every
    response in streams and a task group, ~0.25 ms of CPU a request (measured in-process, 2,000
    requests), and fal's webhooks and every API call pass through here."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            # The router has put the matched route in the scope by now (none: a 404 or a 413).
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            metrics = request_metrics()
            metrics.requests.labels(scope["method"], route, str(status)).inc()
            metrics.seconds.labels(scope["method"], route).observe(time.perf_counter() - started)
