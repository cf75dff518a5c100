"""The wait step: jobs at fal are checked by an asyncio poller, not by Celery tasks.

One poller runs as a thread with its own event loop in the main process of each worker that
consumes the `api` queue (where the dispatcher ran before): no extra process to deploy, and
as many pollers as api workers, each claiming its own batches (claims are atomic, so they
never check the same job twice at once). Each turn it claims the due jobs from the `waiting`
schedule in one round trip, checks them concurrently over one pooled keep-alive
`httpx.AsyncClient`, and writes each outcome: still waiting (next check after a backoff of
1 s → 30 s with jitter), failed at fal, or COMPLETED, whose result is fetched at once (fal
keeps large results only minutes) and handed to `store` straight away.

A job's first check comes when fal could first plausibly be done: the faster end (10th
percentile) of recent inference times, which the poller itself records. fal webhooks, where
configured, are the fast path; then the poller is the safety net (`poll_initial_s` raised).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import httpx
import redis

from config.settings import Settings
from lipsync import jobs
from lipsync.errors import FalError, PermanentError, RetryableError
from lipsync.fal import FalQueueClient, QueueState, QueueStatus
from lipsync.jobstore import JobStore, WaitingJob
from lipsync.keys import Keys
from lipsync.lifecycle import backoff, step
from lipsync.models import AT_FAL_STATUSES, FalLog, FalRequest, JobError, JobStatus
from lipsync.observe import observed_store
from lipsync.redis_client import connect

log = logging.getLogger("lipsync.poller")

RECENT = 100  # inference times kept for the first-check estimate


class FirstCheck:
    """When a newly submitted job is first worth checking, from recent inference times (cached 10 s)."""

    def __init__(self, client: redis.Redis[bytes], keys: Keys, settings: Settings) -> None:
        self.redis, self.key, self.settings = client, keys.fal_seconds, settings
        self._value = settings.poll_initial_s
        self._fetched = float("-inf")

    def delay(self) -> float:
        now = time.monotonic()
        if now - self._fetched > 10.0:
            self._fetched = now
            try:
                recent = sorted(float(v) for v in self.redis.lrange(self.key, 0, RECENT - 1))
            except redis.RedisError:
                recent = []
            if recent:
                self._value = recent[len(recent) // 10]
        return max(self.settings.poll_initial_s, self._value)


def read_status(response: httpx.Response) -> QueueStatus:
    """fal's status answer (202 while queued or running, 200 when COMPLETED), as `FalQueueClient.status`."""
    if response.status_code not in (200, 202):
        raise FalQueueClient._error(response, "status")
    body = response.json()
    metrics = body.get("metrics") or {}
    return QueueStatus(
        state=QueueState(body["status"]),
        queue_position=body.get("queue_position"),
        logs=[FalLog.model_validate(entry) for entry in body.get("logs") or []],
        inference_time=metrics.get("inference_time"),
        error=body.get("error"),
        error_type=body.get("error_type"),
    )


class Poller:
    def __init__(
        self, settings: Settings, send: jobs.Sender, *, batch: int = 200, interval_s: float | None = None
    ) -> None:
        self.settings = settings
        self.send = send
        self.batch = batch
        self.interval_s = settings.dispatch_interval_s if interval_s is None else interval_s
        self.redis = connect(settings.redis_url)
        self.store: JobStore = observed_store(self.redis, settings.key_prefix)
        self.keys = Keys(settings.key_prefix)
        self.lease_s = step("wait").lease_s(settings)
        self._fal: FalQueueClient | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="lipsync-poller", daemon=True)
        self._inference_times: list[float] = []

    # lifecycle of the thread --------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _main(self) -> None:
        asyncio.run(self.run())

    async def run(self) -> None:
        timeout = httpx.Timeout(self.settings.http_timeout_s, connect=min(10.0, self.settings.http_timeout_s))
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        headers = {"Authorization": f"Key {self.settings.fal_key.get_secret_value()}"}
        async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers) as http:
            while not self._stop.is_set():
                try:
                    checked = await self.turn(http)
                except Exception as exc:  # Redis restarting: keep trying, quietly
                    log.warning("poller: %s: %s", type(exc).__name__, exc)
                    await asyncio.sleep(1.0)
                    continue
                if checked < self.batch:
                    await asyncio.sleep(self.interval_s)

    async def turn(self, http: httpx.AsyncClient) -> int:
        """Claim the due jobs, check them all at once; returns how many were claimed."""
        due = self.store.claim_waiting(self.lease_s, self.batch)
        if due:
            await asyncio.gather(*(self.check_one(job, http) for job in due))
            self._record_inference_times()
        return len(due)

    # one job -----------------------------------------------------------------
    async def check_one(self, job: WaitingJob, http: httpx.AsyncClient) -> None:
        try:
            await self.check(job, http)
        except Exception as exc:  # one job's trouble never stops the others
            log.exception("job %s: status check failed: %s", job.id, exc)
            self._retry_later(job, f"unexpected error in the status check: {type(exc).__name__}")

    async def check(self, job: WaitingJob, http: httpx.AsyncClient) -> None:
        if job.fal is None:  # cannot be at fal without a request; the dispatcher's turn
            self.store.unschedule(job.id)
            return
        request = FalRequest.model_validate(job.fal)
        if time.time() > job.deadline_at:
            self._fail(
                job,
                request,
                PermanentError(
                    f"fal did not finish before the job's deadline ({self.settings.job_deadline_s:.0f} s); "
                    "the request was cancelled at fal",
                    code="deadline_exceeded",
                ),
            )
            return
        try:
            status = read_status(await self._get(http, request.status_url, {"logs": "1"}))
            if status.state is not QueueState.completed:
                self._still_waiting(job, request, status)
                return
            if status.error:
                raise FalError(
                    f"fal could not process the request: {status.error}"
                    + (f" ({status.error_type})" if status.error_type else ""),
                    error_type=status.error_type,
                )
            body = await self._result(http, request)
        except RetryableError as exc:
            self._retry_later(job, exc.message, exc.delay)
            return
        except PermanentError as exc:
            self._fail(job, request, exc)
            return
        if status.inference_time is not None:
            self._inference_times.append(float(status.inference_time))
        if jobs.finish_with_result(
            self.store,
            job.id,
            request,
            body,
            via="poll",
            transfer_lease_s=self.settings.transfer_lease_s,
            inference_time=status.inference_time,
            logs=status.logs,
        ):
            self.send("store", job.id)

    async def _get(self, http: httpx.AsyncClient, url: str, params: dict[str, str] | None = None) -> httpx.Response:
        try:
            return await http.get(url, params=params)
        except httpx.TransportError as exc:
            raise RetryableError(f"could not reach fal: {type(exc).__name__}") from None

    async def _result(self, http: httpx.AsyncClient, request: FalRequest) -> dict[str, Any]:
        response = await self._get(http, request.response_url)
        if response.status_code == 200:
            body: dict[str, Any] = response.json()
            return body
        if response.status_code == 400 and "in progress" in response.text.lower():
            raise RetryableError("fal says the result is not ready yet", delay=1.0)
        raise FalQueueClient._error(response, "result")

    # outcomes ----------------------------------------------------------------
    def _still_waiting(self, job: WaitingJob, request: FalRequest, status: QueueStatus) -> None:
        to = JobStatus.in_queue if status.state is QueueState.in_queue else JobStatus.in_progress
        fal = request.model_copy(update={"queue_position": status.queue_position})
        fields: dict[str, Any] = {"fal": fal.model_dump(mode="json")}
        if status.logs:
            fields["logs"] = [entry.model_dump(mode="json") for entry in status.logs[-jobs.LOG_TAIL :]]
        wait = backoff(job.polls + 1, self.settings.poll_initial_s, self.settings.poll_max_s)
        self.store.wait(
            job.id,
            time.time() + wait,
            from_=AT_FAL_STATUSES,
            to=to,
            fields=fields,
            count=["attempts:poll"],
            event=None if to is job.status else f"fal reports {status.state.value}",
        )

    def _retry_later(self, job: WaitingJob, message: str, delay: float | None = None) -> None:
        # Checks are bounded by the job's deadline rather than a count: fal may be slow for long.
        wait = (
            delay
            if delay is not None
            else backoff(job.polls + 1, self.settings.poll_initial_s, self.settings.poll_max_s)
        )
        log.info("job %s: status check will retry in %.1f s: %s", job.id, wait, message)
        self.store.wait(
            job.id,
            time.time() + wait,
            from_=AT_FAL_STATUSES,
            count=["attempts:poll", "attempts:retry_wait"],
            event=f"retry wait in {wait:.1f}s: {message}",
        )

    def _fail(self, job: WaitingJob, request: FalRequest, exc: PermanentError) -> None:
        error = JobError(
            code=exc.code, message=exc.message, fal_error_type=getattr(exc, "error_type", None), stage="poll"
        )
        if not jobs.finish_with_error(self.store, job.id, error, via="poll"):
            return
        if exc.code != "fal_error":  # fal is still working on it (deadline, our refusal): stop paying
            if self._fal is None:
                s = self.settings
                self._fal = FalQueueClient(
                    queue_url=s.fal_queue_url, app=s.fal_app, key=s.fal_key, timeout_s=s.http_timeout_s
                )
            jobs.cancel_at_fal(self.store, self.settings, self.store.get(job.id), fal=self._fal)

    def _record_inference_times(self) -> None:
        if not self._inference_times:
            return
        times: Sequence[float] = self._inference_times
        self._inference_times = []
        pipe = self.redis.pipeline(transaction=False)
        pipe.lpush(self.keys.fal_seconds, *[repr(t) for t in times])
        pipe.ltrim(self.keys.fal_seconds, 0, RECENT - 1)
        pipe.execute()
