"""Submit: admission (global in-flight cap, submit rate), one POST to fal, request_id saved at once.

A job never has two fal requests. The submit claim is written before the POST; a runner that
finds a claim but no request id knows an earlier POST may have reached fal and fails the
job in words instead of paying twice.
"""

from __future__ import annotations

import contextlib
import logging
import time

import redis

from lipsync.errors import PermanentError, RetryableError
from lipsync.fal import SubmitOutcomeUnknown
from lipsync.models import FalRequest, Job, JobStatus
from workers.context import Context
from workers.runner import Lease

HANDLES = frozenset({JobStatus.submitting})
log = logging.getLogger("lipsync.worker")
CLAIM_FIELD = "submit_claimed_at"


def submit(job: Job, ctx: Context, lease: Lease) -> str | None:
    store, settings = ctx.store, ctx.settings
    if job.fal is not None:  # a redelivered submit whose job already has its request
        store.transition(job.id, JobStatus.submitted, from_=HANDLES, schedule_at=time.time(), event="already submitted")
        return "poll"
    if store.raw_field(job.id, CLAIM_FIELD) is not None:
        raise SubmitOutcomeUnknown(
            "an earlier submit of this job was interrupted after it was sent to fal (the worker "
            "stopped or lost its answer); fal may have created a request, so it was not sent "
            "again to avoid paying twice. `lipsync retry` submits it anew."
        )
    if time.time() > job.deadline_at:
        raise PermanentError("the job's deadline passed before it could be submitted", code="deadline_exceeded")
    admission = ctx.admission.admit(job.id)
    if not admission.admitted:
        store.transition(
            job.id,
            None,
            schedule_at=time.time() + max(0.05, admission.retry_after),
        )
        return None
    video, audio = job.inputs["video"], job.inputs["audio"]
    ttl = int(max(settings.presign_ttl_s, job.deadline_at - time.time() + 3600))
    arguments = job.request.model_dump(mode="json", exclude_none=True)
    arguments["video_url"] = ctx.storage.presign_get(video.staging_key, ttl)
    arguments["audio_url"] = ctx.storage.presign_get(audio.staging_key, ttl)
    claimed, _ = store.transition(
        job.id,
        None,
        from_=HANDLES,
        require_absent=[CLAIM_FIELD, "fal"],
        set_fields={f"_{CLAIM_FIELD}": repr(time.time())},
        incr={"attempts:submit": 1},
    )
    if not claimed:
        return None
    webhook = f"{settings.fal_webhook_url.rstrip('/')}/{job.id}" if settings.fal_webhook_url else None
    try:
        request = ctx.fal.submit(arguments, marker=job.id, webhook_url=webhook)
    except RetryableError:
        # Proven not created (connect error, 429, 5xx before fal's queue): free to try again.
        store.transition(job.id, None, delete_fields=[CLAIM_FIELD])
        ctx.admission.release(job.id)
        raise
    except PermanentError:
        ctx.admission.release(job.id)
        raise
    saved = save_request(job, request, ctx)
    if not saved:  # cancelled while the POST was in flight: don't pay for a result nobody wants
        with contextlib.suppress(Exception):
            ctx.fal.cancel(request)
    return None


def save_request(job: Job, request: FalRequest, ctx: Context) -> bool:
    """Record the request fal created, riding out a Redis restart: once fal has it, losing
    its id would fail a paid job (a rerun finds the claim and must not POST again)."""
    deadline = time.monotonic() + ctx.settings.poll_lease_s
    pause = 0.2
    while True:
        try:
            applied, _ = ctx.store.transition(
                job.id,
                JobStatus.submitted,
                from_=HANDLES,
                set_fields={"fal": request.model_dump(mode="json")},
                schedule_at=time.time() + ctx.settings.poll_initial_s,
                event=f"submitted to fal as {request.request_id}",
            )
            return applied
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if time.monotonic() + pause > deadline:
                raise
            log.warning("job %s: saving fal request %s failed (%s); trying again", job.id, request.request_id, exc)
            time.sleep(pause)
            pause = min(2.0, pause * 2)
