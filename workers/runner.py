"""How every step runs: under the job's lease, its outcome written by the engine in one operation.

The runner begins the step (lease taken, working status marked, job read: one round trip),
calls the step's function, and writes what it returns: `Advance` (the job moves on, the next
step's task is sent at once and its schedule entry stays as the safety net), `Wait` (back in
the schedule after a delay; no worker slot held) or `Fail`. Errors become one decision here: a
`RetryableError` waits with backoff a bounded number of times, a `PermanentError` fails the
job in words, anything unexpected is retried a bounded number of times and then fails it.
A runner whose lease was taken over (`LeaseLost`) stops and writes nothing.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import redis
from redis.backoff import EqualJitterBackoff
from redis.retry import Retry

from lipsync import jobs
from lipsync.errors import JobNotFound, PermanentError, RetryableError
from lipsync.jobstore import JobStore, LeaseLost, Moved
from lipsync.lifecycle import Advance, Fail, Outcome, Step, Wait, backoff, next_step
from lipsync.metrics import observe_error
from lipsync.models import AT_FAL_STATUSES, Job, JobError, JobStatus
from lipsync.replication import ReplicaAckTimeout
from workers.context import Context

log = logging.getLogger("lipsync.worker")

__all__ = ["Lease", "StepFunction", "backoff", "resolve", "run_step"]


@dataclass
class Lease:
    """The runner's hold on a job; `heartbeat` renews it during long transfers."""

    store: JobStore
    job_id: str
    owner: str
    seconds: float
    every_s: float
    last_renewed: float = 0.0

    def heartbeat(self) -> None:
        """Renew the lease now and then; raises `LeaseLost` if another runner holds the job now."""
        now = time.monotonic()
        if now - self.last_renewed >= self.every_s:
            if not self.store.renew(self.job_id, self.owner, self.seconds):
                raise LeaseLost(f"job {self.job_id}: the lease lapsed and another runner took the job")
            self.last_renewed = now


StepFunction = Callable[[Job, Context, Lease], Outcome]


def run_step(step: Step, job_id: str, ctx: Context, work: StepFunction) -> None:
    """Run one step of one job and write its outcome."""
    owner = uuid.uuid4().hex
    seconds = step.lease_s(ctx.settings)
    try:
        begun = ctx.store.begin(job_id, owner, seconds, step.handles, working=step.working, counter=step.counter)
    except JobNotFound:
        ctx.store.unschedule(job_id, callback=True)
        return
    if begun.busy:
        log.info("job %s: %s skipped, another worker holds the job", job_id, step.name)
        return
    if begun.job is None:  # not this step's any more (a duplicate message): nothing to do
        if step.name == "callback":  # retried since it ended: its next end queues the callback again
            ctx.redis.zrem(ctx.store.callbacks_key, job_id)
        elif begun.status is not None and begun.status.terminal:
            ctx.store.unschedule(job_id)
        return
    run_begun(step, begun.job, ctx, work, owner, seconds)


def run_begun(step: Step, job: Job, ctx: Context, work: StepFunction, owner: str, seconds: float) -> None:
    """Run a step whose lease `owner` already holds (taken by `begin`, or handed on by the step
    before it) and write its outcome."""
    job_id = job.id
    lease = Lease(ctx.store, job_id, owner, seconds, ctx.settings.heartbeat_s, last_renewed=time.monotonic())
    try:
        try:
            outcome = work(job, ctx, lease)
        except RetryableError as exc:
            observe_error(step.name, exc)
            outcome = retry_later(job, step, ctx, exc.message, exc.code, exc.delay)
        except PermanentError as exc:
            observe_error(step.name, exc)
            outcome = Fail(
                JobError(
                    code=exc.code, message=exc.message, fal_error_type=getattr(exc, "error_type", None), stage=step.name
                )
            )
        except LeaseLost:
            raise
        except Exception as exc:  # a bug or an unforeseen failure: bounded retries, then words
            log.exception("job %s: unexpected error in %s", job_id, step.name)
            observe_error(step.name, exc)
            message = f"unexpected error while running {step.name}: {type(exc).__name__}"
            outcome = retry_later(job, step, ctx, message, "internal_error", None)
        apply(step, job, outcome, ctx, owner)
    except LeaseLost as exc:
        log.warning("job %s: %s stopped, nothing written: %s", job_id, step.name, exc)


def retry_later(job: Job, step: Step, ctx: Context, message: str, code: str, delay: float | None) -> Wait | Fail:
    settings = ctx.settings
    attempt = job.attempts.get(f"retry_{step.name}", 0) + 1
    wait = delay if delay is not None else backoff(attempt, settings.retry_base_s, settings.retry_max_s)
    if attempt > settings.max_retries or time.time() + wait > job.deadline_at:
        return Fail(
            JobError(
                code=code,
                message=f"gave up on {step.name} after {attempt} attempts: {message}",
                retryable=True,
                stage=step.name,
            )
        )
    log.info("job %s: %s will retry in %.1f s: %s", job.id, step.name, wait, message)
    return Wait(wait, event=f"retry {step.name} in {wait:.1f}s: {message}", count=(f"attempts:retry_{step.name}",))


def apply(step: Step, job: Job, outcome: Outcome, ctx: Context, owner: str) -> None:
    """Write a step's outcome: one atomic operation, which also gives the lease back."""
    store = ctx.store
    from_ = step.handles | ({step.working} if step.working else frozenset())
    if outcome is None:
        store.release(job.id, owner)
    elif isinstance(outcome, Wait):
        store.wait(
            job.id, time.time() + outcome.seconds, from_=from_, to=outcome.to, fields=outcome.fields,
            event=outcome.event, owner=owner, count=outcome.count,
        )  # fmt: skip
    elif isinstance(outcome, Fail):
        fail_job(job, ctx, outcome.error, owner, from_=from_)
    else:
        advance(job, outcome, ctx, owner, from_)


def due_for(status: JobStatus, ctx: Context) -> float | None:
    """When the job in `status` is next due: a Celery step's entry is the safety net for a lost
    message (a lease ahead); a job at fal is first checked when fal could plausibly be done."""
    following = next_step(status)
    if following is None:
        return None
    if following.queue is None:
        return time.time() + ctx.first_check.delay()
    return time.time() + following.lease_s(ctx.settings)


# Saving a fact that already happened at fal (its request id) rides out a Redis restart in place,
# for about 40 s (30 tries, at most 2 s apart): there is nowhere durable to hand the id to (the
# broker is the same Redis), and giving up would lose a request already paid for.
# A replica that does not acknowledge it in time (policy refuse) is waited for the same way: the
# retry rewrites the same id, so that WAIT covers it (`JobStore.advance(durable=True)`).
_SETTLED_RETRY = Retry(
    EqualJitterBackoff(cap=2.0, base=0.2),
    retries=30,
    supported_errors=(redis.ConnectionError, redis.TimeoutError, socket.timeout, ReplicaAckTimeout),
)


def advance(job: Job, outcome: Advance, ctx: Context, owner: str, from_: frozenset[JobStatus]) -> None:
    due_at = due_for(outcome.to, ctx)
    following = next_step(outcome.to)
    # A step that runs in place gets our lease handed on in the same write, and the job as written.
    hand_to = None
    if following is not None and following.inline and following.queue is not None:
        hand_to = (uuid.uuid4().hex, following.lease_s(ctx.settings))

    def write(lease_owner: str) -> Moved:
        return ctx.store.advance(
            job.id, outcome.to, from_=from_, fields=outcome.fields, event=outcome.event, due_at=due_at,
            owner=lease_owner, count=outcome.count, durable=outcome.settled, hand_to=hand_to,
        )  # fmt: skip

    if outcome.settled:

        def failed(exc: Exception) -> None:
            # The event names what is at stake (e.g. fal's request id): an operator can find it.
            log.warning("job %s: saving %r failed (%s); trying again", job.id, outcome.event or outcome.to.value, exc)

        moved = _SETTLED_RETRY.call_with_retry(lambda: write(f"?{owner}"), failed)
    else:
        moved = write(owner)
    if not moved.applied:
        if outcome.if_refused is not None:
            outcome.if_refused()
        return
    if following is None or following.queue is None:
        return
    if hand_to is not None and moved.job is not None:  # this worker runs it now: no message, no task
        try:
            run_begun(following, moved.job, ctx, resolve(following.function), *hand_to)
            return
        except Exception as exc:  # its queue takes it (and the schedule, should the send fail too)
            log.warning("job %s: could not run %s in place: %s", job.id, following.name, exc)
            with contextlib.suppress(Exception):
                ctx.store.release(job.id, hand_to[0])
    try:
        ctx.send(following.name, job.id)
    except Exception as exc:  # the schedule entry sends it a little later
        log.warning("job %s: could not send %s: %s", job.id, following.name, exc)


def resolve(reference: str) -> StepFunction:
    """A step's function from its "module:function" reference in the lifecycle table."""
    module, _, name = reference.partition(":")
    function: StepFunction = getattr(importlib.import_module(module), name)
    return function


def fail_job(
    job: Job, ctx: Context, error: JobError, owner: str | None = None, *, from_: frozenset[JobStatus] | None = None
) -> None:
    """Fail a job for good; if fal is still working on it, ask fal to stop (we'd pay for nothing)."""
    moved = ctx.store.fail(job.id, error, from_=from_, owner=owner)
    if not moved.applied:
        return
    log.warning("job %s failed (%s): %s", job.id, error.code, error.message)
    if job.fal is not None and moved.before in AT_FAL_STATUSES:
        jobs.cancel_at_fal(ctx.store, ctx.settings, job, fal=ctx.fal)


def saved_request_id(ctx: Context, job_id: str) -> str | None:
    saved = ctx.store.raw_field(job_id, "fal")
    return None if saved is None else str(json.loads(saved).get("request_id"))
