"""How every stage runs: under the job's lease, with errors turned into one decision.

A `RetryableError` puts the job back in the schedule after a backoff (never a sleeping task,
never a long countdown message); a `PermanentError` fails the job with its message; anything
unexpected is retried a bounded number of times and then fails the job, in words.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from lipsync.errors import PermanentError, RetryableError
from lipsync.metrics import observe_error
from lipsync.models import AT_FAL_STATUSES, Job, JobError, JobStatus
from workers.context import Context

log = logging.getLogger("lipsync.worker")

# Which task a job needs next, by its status.
NEXT_TASK: dict[JobStatus, str] = {
    JobStatus.queued: "stage",
    JobStatus.staging: "stage",
    JobStatus.submitting: "submit",
    JobStatus.submitted: "poll",
    JobStatus.in_queue: "poll",
    JobStatus.in_progress: "poll",
    JobStatus.storing: "store",
}
QUEUE_OF: dict[str, str] = {"stage": "transfer", "store": "transfer", "submit": "api", "poll": "api"}


def backoff(attempt: int, initial: float, cap: float) -> float:
    """Exponential backoff with jitter: about initial·2^(attempt-1), at most `cap`."""
    base = min(cap, initial * (2 ** max(0, attempt - 1)))
    return float(base * random.uniform(0.75, 1.25))


def lease_for(stage: str, ctx: Context) -> float:
    return ctx.settings.transfer_lease_s if QUEUE_OF[stage] == "transfer" else ctx.settings.poll_lease_s


@dataclass
class Lease:
    """The runner's hold on a job; `heartbeat` renews it during long transfers."""

    ctx: Context
    job_id: str
    owner: str
    seconds: float
    last_renewed: float = 0.0

    def heartbeat(self) -> None:
        now = time.monotonic()
        if now - self.last_renewed >= self.ctx.settings.heartbeat_s:
            self.ctx.store.renew(self.job_id, self.owner, self.seconds)
            self.last_renewed = now


StageFunction = Callable[[Job, Context, Lease], str | None]


def run_stage(stage: str, job_id: str, ctx: Context, handles: frozenset[JobStatus], work: StageFunction) -> str | None:
    """Run one stage of one job. Returns the next task to send at once, if any."""
    owner = uuid.uuid4().hex
    seconds = lease_for(stage, ctx)
    if not ctx.store.acquire(job_id, owner, seconds):
        log.info("job %s: %s skipped, another worker holds the job", job_id, stage)
        return None
    lease = Lease(ctx, job_id, owner, seconds, last_renewed=time.monotonic())
    job = ctx.store.get(job_id)
    if job.status not in handles:
        ctx.store.transition(job_id, None, release=owner)
        if job.terminal:
            ctx.store.transition(job_id, None, unschedule=True)
        return None
    try:
        next_task = work(job, ctx, lease)
    except RetryableError as exc:
        observe_error(stage, exc)
        retry_later(job, stage, ctx, owner, exc.message, exc.code, exc.delay)
        return None
    except PermanentError as exc:
        observe_error(stage, exc)
        error = JobError(
            code=exc.code,
            message=exc.message,
            fal_error_type=getattr(exc, "error_type", None),
            stage=stage,
        )
        fail_job(job, ctx, error, owner)
        return None
    except Exception as exc:  # a bug or an unforeseen failure: bounded retries, then words
        log.exception("job %s: unexpected error in %s", job_id, stage)
        observe_error(stage, exc)
        message = f"unexpected error while running {stage}: {type(exc).__name__}"
        retry_later(job, stage, ctx, owner, message, "internal_error", None)
        return None
    ctx.store.transition(job_id, None, release=owner)
    return next_task


def retry_later(job: Job, stage: str, ctx: Context, owner: str, message: str, code: str, delay: float | None) -> None:
    settings = ctx.settings
    attempt = job.attempts.get(f"retry_{stage}", 0) + 1
    if stage == "poll":
        # Polls are bounded by the job's deadline rather than a count: fal may be slow for long.
        wait = delay if delay is not None else backoff(attempt, settings.poll_initial_s, settings.poll_max_s)
        give_up = time.time() + wait > job.deadline_at
    else:
        wait = delay if delay is not None else backoff(attempt, settings.retry_base_s, settings.retry_max_s)
        give_up = attempt > settings.max_retries or time.time() + wait > job.deadline_at
    if give_up:
        error = JobError(
            code=code,
            message=f"gave up on {stage} after {attempt} attempts: {message}",
            retryable=True,
            stage=stage,
        )
        fail_job(job, ctx, error, owner)
        return
    log.info("job %s: %s will retry in %.1f s: %s", job.id, stage, wait, message)
    ctx.store.transition(
        job.id,
        None,
        incr={f"attempts:retry_{stage}": 1},
        schedule_at=time.time() + wait,
        release=owner,
        event=f"retry {stage} in {wait:.1f}s: {message}",
    )


def fail_job(job: Job, ctx: Context, error: JobError, owner: str | None = None) -> None:
    """Fail a job for good; if fal is still working on it, ask fal to stop (we'd pay for nothing)."""
    applied, _ = ctx.store.transition(
        job.id,
        JobStatus.failed,
        from_=[s for s in JobStatus if not s.terminal],
        set_fields={"error": error.model_dump(mode="json")},
        release=owner,
        event=f"failed: {error.code}: {error.message}",
    )
    if not applied:
        return
    log.warning("job %s failed (%s): %s", job.id, error.code, error.message)
    if job.fal is not None and job.status in AT_FAL_STATUSES:
        try:
            ctx.fal.cancel(job.fal)
        except Exception as exc:  # best effort: the job is already failed in our books
            log.warning("job %s: could not cancel fal request: %s", job.id, exc)
    ctx.admission.release(job.id)
