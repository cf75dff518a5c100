"""The wait step: jobs at fal are checked by an asyncio poller, not by Celery tasks.

One poller runs as a thread with its own event loop in the main process of each worker that
consumes the `api` queue (where the dispatcher ran before): no extra process to deploy, and
as many pollers as api workers, each claiming its own batches (claims are atomic, so they
never check the same job twice at once). Each turn it claims the due jobs from the `waiting`
schedule in one round trip, checks them concurrently over a few small keep-alive
HTTP pools (`FalHttp`), and writes each outcome: still waiting (next check after a backoff of
1 s → 30 s with jitter), failed at fal, or COMPLETED, whose result is fetched at once (fal
keeps large results only minutes) and handed to `store` straight away.

A job's first check comes when fal has most likely finished: the 75th percentile of recent times at fal
(submit to result), which the poller itself records; on a cold start a few scout jobs (the first
submitted) are checked closely until the first one ends. fal webhooks, where
configured, are the fast path; then the poller is the safety net (`poll_initial_s` raised).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import redis

from config.settings import Settings
from lipsync import jobs
from lipsync.account import AccountBreaker
from lipsync.admission import AdmissionControl
from lipsync.errors import FalError, InputDownloadFailed, PermanentError, RetryableError
from lipsync.fal import (
    FILE_DOWNLOAD_ERROR,
    START_TIMEOUT_TYPE_HEADER,
    FalQueueClient,
    QueueState,
    QueueStatus,
    auth_headers,
    download_failure,
    http_timeout,
    read_status,
)
from lipsync.jobstore import JobStore, WaitingJob
from lipsync.keys import Keys
from lipsync.lifecycle import backoff, step
from lipsync.models import AT_FAL_STATUSES, FalRequest, JobError, JobStatus
from lipsync.observe import observed_store
from lipsync.redis_client import connect
from lipsync.storage import Storage

log = logging.getLogger("lipsync.poller")

RECENT = 100  # times at fal kept for the first-check estimate
IDLE_S = 1.0  # the longest pause with nothing due
# Status checks in flight at once, and the keep-alive connections to fal they share, split over
# a few small pools. httpx's pool scans every waiting request and every connection (asking each
# socket whether it expired) at every hand-out: with 200 checks queued on one pool of 100
# connections that scan was most of the poller's CPU (1,000 jobs at fal). Checks wait for a slot
# instead, and each pool holds 8 connections: 32 at ~100 ms a check is ~300 checks a second.
CONNECTIONS = 32
POOLS = 4


class FalHttp:
    """The poller's GETs to fal: a few small keep-alive pools (`httpx.Client`) used in turn, each
    request made on one of `CONNECTIONS` threads and awaited from the event loop.

    Blocking clients on threads, not `httpx.AsyncClient`: the asynchronous client's per-request
    machinery (anyio's cancel scopes and checkpoints in httpcore) cost 1.6 ms of CPU per status
    check here, the same request on a thread 1.0 ms (2,000 GETs to the emulator, 32 at a time).
    The event loop still does the waiting: claiming, concurrency, backoff, hand-offs."""

    def __init__(self, settings: Settings) -> None:
        timeout, headers = http_timeout(settings.http_timeout_s), auth_headers(settings.fal_key)
        limits = httpx.Limits(max_connections=CONNECTIONS // POOLS, max_keepalive_connections=CONNECTIONS // POOLS)
        tls = httpx.create_ssl_context()  # one for the pools: each loads the CA bundle (~15 ms of CPU)
        self.clients = [httpx.Client(timeout=timeout, limits=limits, headers=headers, verify=tls) for _ in range(POOLS)]
        self._threads = ThreadPoolExecutor(CONNECTIONS, thread_name_prefix="lipsync-poller-http")
        self._next = 0

    async def get(self, url: str, params: dict[str, str] | None = None) -> httpx.Response:
        self._next = (self._next + 1) % len(self.clients)
        request = functools.partial(self.clients[self._next].get, url, params=params)
        return await asyncio.get_running_loop().run_in_executor(self._threads, request)

    def close(self) -> None:
        """After the last turn: no request is in flight then (a turn awaits all its checks)."""
        self._threads.shutdown(wait=True)
        for client in self.clients:
            client.close()


SCOUTS = 2  # jobs checked closely while fal's typical time is unknown (a cold start)
# On a cold start the other jobs wait this many backoff caps (2 min by default) for their first
# check: the first scout's end brings them forward long before, unless fal takes minutes; a check
# at the cap itself found every job of a long batch still running (one wasted check and one
# status write per job at 60 s a job).
COLD_WAIT_CAPS = 4


class FirstCheck:
    """When a job at fal has most likely finished: the 75th percentile of recent times at fal
    (submit to result, each learned to within a few per cent), shared by every worker through
    Redis (read at most every 10 s). Most jobs are done at their first check; the rest are looked
    at closely from then on (`Poller._next_check`). Earlier first checks were tried (the 10th
    percentile, the median): most jobs were then checked two or three times, and each check that
    finds a job still running costs a Redis round trip, and the first one a status write."""

    def __init__(self, client: redis.Redis[bytes], keys: Keys, settings: Settings) -> None:
        self.redis, self.key, self.settings = client, keys.fal_seconds, settings
        self.scouts_key = keys.fal_scouts
        self._scouts_made_until = float("-inf")  # monotonic: this cold start has its scouts already
        self._typical: float | None = None
        self._fetched = float("-inf")

    def typical(self) -> float | None:
        now = time.monotonic()
        # Unknown, it is looked for every second: a job submitted just after the first end was
        # learned elsewhere must not be taken for a cold start's.
        if now - self._fetched > (10.0 if self._typical is not None else 1.0):
            self._fetched = now
            try:
                recent = [float(v) for v in self.redis.lrange(self.key, 0, RECENT - 1)]
            except redis.RedisError:
                recent = []
            if recent:
                self._typical = _typical(recent)
        return self._typical

    def delay(self) -> float:
        """Seconds from submit to the first status check. On a cold start (nothing learned yet)
        the first `SCOUTS` jobs submitted are checked after `poll_initial_s` and then closely by
        the poller; the others wait `COLD_WAIT_CAPS` backoff caps, and the first end learned brings their
        checks forward (`JobStore.bring_checks_forward`): one check each instead of a check
        after a second that finds every job still running."""
        typical = self.typical()
        if typical is not None:
            return max(self.settings.poll_initial_s, typical)
        cold_wait = self.settings.poll_max_s * COLD_WAIT_CAPS
        if time.monotonic() < self._scouts_made_until:
            return cold_wait
        try:
            made = int(self.redis.incr(self.scouts_key))
            if made == 1:  # the cold start's first: its scouts are counted for a while
                self.redis.expire(self.scouts_key, int(self.settings.poll_max_s) + 1)
            scout = made <= SCOUTS
        except redis.RedisError:
            scout = True
        if not scout:  # no need to ask again until the count expires
            self._scouts_made_until = time.monotonic() + self.settings.poll_max_s
        return self.settings.poll_initial_s if scout else cold_wait

    def learn(self, seconds: Sequence[float]) -> float | None:
        """Record times at fal just seen; returns the typical time when it is new or shorter by a fifth."""
        before = self.typical()
        pipe = self.redis.pipeline(transaction=False)
        pipe.lpush(self.key, *[repr(t) for t in seconds])
        pipe.ltrim(self.key, 0, RECENT - 1)
        pipe.lrange(self.key, 0, RECENT - 1)
        recent = [float(v) for v in pipe.execute()[2]]
        self._typical, self._fetched = _typical(recent), time.monotonic()
        if before is None or self._typical < 0.8 * before:
            return self._typical
        return None


def _typical(seconds: Sequence[float]) -> float:
    ordered = sorted(seconds)
    return ordered[len(ordered) * 3 // 4]


class _NotStartedInTime(PermanentError):
    code = "deadline_exceeded"


class Poller:
    def __init__(self, settings: Settings, send: jobs.Sender, *, batch: int = 200, interval_s: float = 0.02) -> None:
        self.settings = settings
        self.send = send
        self.batch = batch
        self.interval_s = interval_s  # between turns that found work: let the loop breathe
        self.redis = connect(settings.redis_url)
        self.store: JobStore = observed_store(self.redis, settings.key_prefix)
        self.keys = Keys(settings.key_prefix)
        self.lease_s = step("wait").lease_s(settings)
        self._fal: FalQueueClient | None = None
        self._s3: Storage | None = None  # built at the first input fal could not download
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="lipsync-poller", daemon=True)
        self._inference_times: list[float] = []
        self.first_check = FirstCheck(self.redis, self.keys, settings)
        # The scouts of a cold start (see `_next_check`): job id -> (submitted at, last checked at).
        self._scouts: dict[str, tuple[float, float]] = {}
        # When this poller last found each job not done yet: a job seen done was done somewhere
        # between that check and this one (see `_time_at_fal`).
        self._not_done_at: dict[str, float] = {}
        self._learned_at = float("-inf")  # monotonic: when times at fal were last recorded
        # Dispatch runs when this poller moved a job off fal (its slot came back) or a second has
        # passed (slots freed elsewhere: webhooks, cancels, failed submits), not on every turn.
        self._freed = True
        self._dispatched_at = 0.0
        self.admission = AdmissionControl.from_settings(self.redis, settings)
        self.account = AccountBreaker(self.redis, self.keys, settings)

    # lifecycle of the thread --------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _main(self) -> None:
        asyncio.run(self.run())

    async def run(self) -> None:
        http = FalHttp(self.settings)
        try:
            while not self._stop.is_set():
                try:
                    pause = await self.turn(http)
                except Exception as exc:  # Redis restarting: keep trying, quietly
                    log.warning("poller: %s: %s", type(exc).__name__, exc)
                    pause = 1.0
                if pause > 0:
                    await asyncio.sleep(pause)
        finally:
            http.close()

    async def turn(self, http: FalHttp) -> float:
        """Claim the due jobs and check them all at once; returns how long to pause before the next turn.

        With nothing due it sleeps until the next check is due, at most `IDLE_S`: a job whose
        check is brought forward meanwhile (a new submit is first due a second or more ahead)
        waits no longer than that.
        """
        due, next_due = self.store.claim_waiting_or_next(self.lease_s, self.batch)
        if due:
            slots = asyncio.Semaphore(CONNECTIONS)  # checks wait here, not in httpx's pool

            async def bounded(job: WaitingJob) -> None:
                async with slots:
                    await self.check_one(job, http)

            await asyncio.gather(*(bounded(job) for job in due))
            self._record_inference_times()
            pause = 0.0 if len(due) >= self.batch else self.interval_s
        elif next_due is None:
            pause = IDLE_S
        else:
            pause = min(IDLE_S, max(0.01, next_due - time.time()))
        if self._freed or time.monotonic() - self._dispatched_at >= IDLE_S:
            self.dispatch()  # the slots this turn freed (and any freed elsewhere since the last)
        return pause

    # dispatch ----------------------------------------------------------------
    def dispatch(self) -> list[str]:
        """Hand every free admission slot to the job whose turn it is (the fair queue's head): the
        slot is reserved for it and its submit task sent at once. Jobs refused for a full cap wait
        `admission_recheck_s` (a safety net) rather than asking every second; this is what admits
        them when a slot frees: a job leaving fal here, or by a webhook, cancel, deadline or a
        submit that did not reach fal (seen at the next turn, at most `IDLE_S` later). A lost wake
        costs seconds: the job holds its slot and the same call brought its schedule entry forward."""
        self._freed, self._dispatched_at = False, time.monotonic()
        try:
            if not self.admission.anyone_waiting():  # one EXISTS: the usual answer when fal has room
                return []
            if self.account.state() is not None:  # a locked account: its probe decides, not us
                return []
            woken = self.admission.dispatch()
        except redis.RedisError as exc:
            log.warning("poller: dispatch: %s: %s", type(exc).__name__, exc)
            return []
        for job_id in woken:
            try:
                self.send("submit", job_id)
            except Exception as exc:  # its recheck admits it (it holds the slot)
                log.warning("job %s: could not wake it for its slot: %s", job_id, exc)
        return woken

    # one job -----------------------------------------------------------------
    async def check_one(self, job: WaitingJob, http: FalHttp) -> None:
        begun = time.time()
        try:
            await self.check(job, http)
        except Exception as exc:  # one job's trouble never stops the others
            log.exception("job %s: status check failed: %s", job.id, exc)
            self._retry_later(job, f"unexpected error in the status check: {type(exc).__name__}")
        scout = self._scouts.get(job.id)
        if scout is not None and scout[1] < begun:  # it left (done, failed): a scout no more
            del self._scouts[job.id]

    async def check(self, job: WaitingJob, http: FalHttp) -> None:
        if job.fal is None or job.status not in AT_FAL_STATUSES:
            # Not at fal (any more): the dispatcher's, if it needs a step at all.
            self.store.unschedule(job.id)
            if not job.status.terminal:
                self.store.schedule(job.id, time.time())
            return
        request = FalRequest.model_validate(job.fal)
        if job.submitted_at is not None and time.time() > job.submitted_at + self.settings.max_run_s:
            overdue = PermanentError(
                f"the request was at fal longer than max_run_s ({self.settings.max_run_s:.0f} s); "
                "it was cancelled at fal",
                code="max_run_exceeded",
            )
            self._fail(job, request, overdue)
            return
        try:
            status = read_status(await self._get(http, request.status_url, {"logs": "1"}))
            if status.state is not QueueState.completed:
                # The deadline bounds waiting, not paid work: a request not started yet is cancelled
                # at no cost; a running one goes on (only a cancel or `max_run_s` stops it).
                if status.state is QueueState.in_queue and time.time() > job.deadline_at:
                    raise _NotStartedInTime(
                        "cancelled at no cost: the job's deadline passed while it waited in fal's queue, "
                        "before fal started it"
                    )
                self._still_waiting(job, request, status)
                return
            if status.error_type == "request_timeout":
                result = await self._get(http, request.response_url)
                if result.headers.get(START_TIMEOUT_TYPE_HEADER, "").lower() == "user":
                    self._not_started(job, request)
                    return
            if status.error:
                failed_download = await self._download_failure(http, request, status)
                if failed_download is not None:
                    raise failed_download
                raise FalError(
                    f"fal could not process the request: {status.error}"
                    + (f" ({status.error_type})" if status.error_type else ""),
                    error_type=status.error_type,
                )
            body = await self._result(http, request)
        except RetryableError as exc:
            self._retry_later(job, exc.message, exc.delay)
            return
        except InputDownloadFailed as exc:
            await self._inputs_not_downloaded(job, exc)
            return
        except PermanentError as exc:
            self._fail(job, request, exc)
            return
        if job.submitted_at is not None:
            self._inference_times.append(self._time_at_fal(job))
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
            self._freed = True
            self.send("store", job.id)

    async def _get(self, http: FalHttp, url: str, params: dict[str, str] | None = None) -> httpx.Response:
        try:
            return await http.get(url, params=params)
        except httpx.TransportError as exc:
            raise RetryableError(f"could not reach fal: {type(exc).__name__}") from None

    async def _result(self, http: FalHttp, request: FalRequest) -> dict[str, Any]:
        response = await self._get(http, request.response_url)
        if response.status_code == 200:
            body: dict[str, Any] = response.json()
            return body
        if response.status_code == 400 and "in progress" in response.text.lower():
            raise RetryableError("fal says the result is not ready yet", delay=1.0)
        raise FalQueueClient._error(response, "result")

    async def _download_failure(
        self, http: FalHttp, request: FalRequest, status: QueueStatus
    ) -> InputDownloadFailed | None:
        """Whether a failed request failed because fal could not download an input: its result (the
        model error's `detail`) says so; so may the status's error_type."""
        response = await self._get(http, request.response_url)
        error = None if response.status_code == 200 else FalQueueClient._error(response, "result")
        if isinstance(error, InputDownloadFailed):
            return error
        return download_failure(None, status.error) if status.error_type == FILE_DOWNLOAD_ERROR else None

    # outcomes ----------------------------------------------------------------
    async def _inputs_not_downloaded(self, job: WaitingJob, failure: InputDownloadFailed) -> None:
        """fal could not download the inputs: submit again with fresh URLs if our S3 has them and is
        reachable (`jobs.after_input_download_failure` bounds it); while S3 cannot be reached from here
        either, a resubmission would fail the same way, so wait and look again, until the deadline."""
        full = self.store.get(job.id)
        if self._s3 is None:
            self._s3 = Storage(self.settings)
        try:
            missing = await asyncio.to_thread(jobs.staged_inputs_missing, self._s3, full)
        except RetryableError as exc:
            if time.time() < job.deadline_at:
                # A short look-again, not the job's poll backoff: S3 back is the moment to resubmit.
                wait = backoff(1, self.settings.fal_download_backoff_s, self.settings.fal_download_backoff_max_s)
                self._retry_later(
                    job,
                    f"{failure.message}, and our S3 cannot be reached from here either ({exc.message}); "
                    "looking again before submitting again",
                    wait,
                )
                return
            missing = []  # the deadline passed with S3 away: fail in words below
        except PermanentError as exc:  # S3 answers, but not about the object (access): resubmit, bounded
            log.warning("job %s: could not check the staged inputs: %s", job.id, exc.message)
            missing = []
        self._freed = True
        moved = jobs.after_input_download_failure(
            self.store,
            self.settings,
            job.id,
            failure,
            resubmits=full.attempts.get(jobs.DOWNLOAD_RESUBMITS.partition(":")[2], 0),
            deadline_at=job.deadline_at,
            via="poll",
            missing=missing,
        )
        log.info("job %s: fal could not download the inputs; %s", job.id, moved.value if moved else "already moved")

    def _time_at_fal(self, job: WaitingJob) -> float:
        """What the job spent at fal, submit to result (fetching inputs, queue, inference): the first
        check's moment. It ended between the last check that found it not done and this one: the
        middle of that span, not this check's moment, or every check's lateness would be learned
        into the next jobs' first check and never unlearned."""
        assert job.submitted_at is not None
        now = time.time()
        before = self._not_done_at.pop(job.id, None)
        ended = now
        if before is not None and now - before <= 0.2 * (now - job.submitted_at):
            ended = (before + now) / 2  # a close look; a long gap (a first check) says little
        return max(0.0, ended - job.submitted_at)

    def _still_waiting(self, job: WaitingJob, request: FalRequest, status: QueueStatus) -> None:
        if len(self._not_done_at) >= 50_000:  # jobs that left by another door: forget the oldest
            for stale in list(self._not_done_at)[:10_000]:
                del self._not_done_at[stale]
        self._not_done_at.pop(job.id, None)  # to the end: the dict is in order of last check
        self._not_done_at[job.id] = time.time()
        to = JobStatus.in_queue if status.state is QueueState.in_queue else JobStatus.in_progress
        due_at = self._next_check(job)
        if to is job.status and status.queue_position == request.queue_position:
            self.store.check_again(job.id, due_at)  # nothing new to write (logs come with the next change)
            return
        fal = request.model_copy(update={"queue_position": status.queue_position})
        fields: dict[str, Any] = {"fal": fal.model_dump(mode="json")}
        if status.logs:
            fields["logs"] = [entry.model_dump(mode="json") for entry in status.logs[-jobs.LOG_TAIL :]]
        self.store.wait(
            job.id,
            due_at,
            from_=AT_FAL_STATUSES,
            to=to,
            fields=fields,
            event=None if to is job.status else f"fal reports {status.state.value}",
        )

    def _next_check(self, job: WaitingJob) -> float:
        """Backoff with jitter (1 s → 30 s); but never later than the job could plausibly be done,
        and once past that moment, the backoff starts again from there."""
        now = time.time()
        settings = self.settings
        typical = self.first_check.typical()
        if typical is None:
            # Nothing learned yet (a cold start): a few jobs, the scouts, are checked closely;
            # the first end teaches the typical time, which brings every other job's check
            # forward to when it could be done. Until then the others wait (`COLD_WAIT_CAPS`).
            # A few checks for the batch instead of a late notice for each. The scouts are the
            # jobs submitted first (of those this poller checks): they end first.
            submitted = job.submitted_at if job.submitted_at is not None else now
            self._scouts = {i: v for i, v in self._scouts.items() if now - v[1] < settings.poll_max_s}
            if job.id not in self._scouts and len(self._scouts) >= SCOUTS:
                latest = max(self._scouts, key=lambda i: self._scouts[i][0])
                if submitted < self._scouts[latest][0]:
                    del self._scouts[latest]  # at its next check it waits at the cap like the rest
            if job.id in self._scouts or len(self._scouts) < SCOUTS:
                self._scouts[job.id] = (submitted, now)
                # Checked at a sixth of its time at fal so far: the first end is learned within
                # about 8 %, and every other job's first check depends on it.
                elapsed = now - job.submitted_at if job.submitted_at is not None else settings.poll_initial_s
                return now + self._resolution(elapsed, 6) * random.uniform(0.9, 1.1)
            return now + settings.poll_max_s * COLD_WAIT_CAPS * random.uniform(0.75, 1.0)
        if job.submitted_at is None:
            return now + backoff(job.polls + 1, settings.poll_initial_s, settings.poll_max_s)
        plausible = job.submitted_at + typical
        if now < plausible:
            return min(plausible, now + backoff(job.polls + 1, settings.poll_initial_s, settings.poll_max_s))
        # Overdue: check again after about half the time it is overdue (from a tenth of the typical
        # time, `_resolution`, up to 30 s): just after the plausible end a job is most likely done.
        overdue = now - plausible
        floor = self._resolution(typical, 10)
        return now + min(settings.poll_max_s, max(floor, overdue / 2)) * random.uniform(0.75, 1.25)

    def _resolution(self, seconds: float, parts: int) -> float:
        """How finely to look at a span of `seconds`: a `parts`-th of it, 0.2 s at least and at most
        `poll_initial_s`; so a job past its plausible end of 5 s is noticed within about a quarter
        second, not a second. With fal's webhooks the poller is only the safety net: `poll_initial_s`."""
        if self.settings.fal_webhook_url:
            return self.settings.poll_initial_s
        return min(self.settings.poll_initial_s, max(0.2, seconds / parts))

    def _not_started(self, job: WaitingJob, request: FalRequest) -> None:
        """fal dropped the request unstarted (X-Fal-Request-Timeout): nothing ran, nothing is billed."""
        if time.time() >= job.deadline_at:
            error = _NotStartedInTime(
                "cancelled at no cost: fal did not start the request before the job's deadline "
                "(X-Fal-Request-Timeout); nothing ran"
            )
            self._fail(job, request, error)
            return
        moved = self.store.resubmit(
            job.id,
            from_=AT_FAL_STATUSES,
            clear=("fal", "submit_claimed_at", "submit_input"),
            event=f"fal dropped request {request.request_id} unstarted (start timeout, not billed); submitting again",
        )
        if moved.applied:
            self._freed = True
            self.send("submit", job.id)

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
            count=["attempts:retry_wait"],
            event=f"retry wait in {wait:.1f}s: {message}",
        )

    def _fail(self, job: WaitingJob, request: FalRequest, exc: PermanentError) -> None:
        error = JobError(
            code=exc.code, message=exc.message, fal_error_type=getattr(exc, "error_type", None), stage="poll"
        )
        if not jobs.finish_with_error(self.store, job.id, error, via="poll"):
            return
        self._freed = True
        if exc.code != "fal_error":  # fal is still working on it (deadline, our refusal): stop paying
            if self._fal is None:
                s = self.settings
                self._fal = FalQueueClient(
                    queue_url=s.fal_queue_url, app=s.fal_app, key=s.fal_key, timeout_s=s.http_timeout_s
                )
            jobs.cancel_at_fal(self.store, self.settings, self.store.get(job.id), fal=self._fal)

    def _record_inference_times(self) -> None:
        # Learned at most once a second (three commands each time), except the first time, which
        # brings a cold start's checks forward at once.
        if not self._inference_times:
            return
        if self.first_check.typical() is not None and time.monotonic() - self._learned_at < IDLE_S:
            return
        self._learned_at = time.monotonic()
        seen, self._inference_times = self._inference_times, []
        typical = self.first_check.learn(seen)
        if typical is not None:
            # Learned (or shorter than thought): jobs waiting past their plausible end are checked
            # then, a recheck's interval after it: what was learned is the quickest end so far (on
            # a cold start the first scout's, alone), which most jobs of the batch come after.
            moved = self.store.bring_checks_forward(typical + self._resolution(typical, 10))
            log.info("poller: fal typically needs %.1f s; %d checks brought forward", typical, moved)
