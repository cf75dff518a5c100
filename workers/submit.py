"""Submit: admission (global in-flight cap, submit rate), one POST to fal, request_id saved at once.

A job never has two fal requests. The submit claim is written before the POST; a runner that
finds a claim but no request id knows an earlier POST may have reached fal and fails the
job in words instead of paying twice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time

from redis.backoff import EqualJitterBackoff
from redis.retry import Retry

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
        request = ctx.fal.submit(arguments, marker=job.id, webhook_url=webhook, priority=job.fal_priority)
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


# Saving the id of a request fal already accepted rides out a Redis restart in place, for about
# 40 s (30 tries, at most 2 s apart). This is the one wait in a task, and it waits on Redis,
# not on fal: while Redis is down no other job can move either, and there is nowhere durable
# to hand the id to (the broker is the same Redis). Giving up would fail a job already paid for.
_SAVE_RETRY = Retry(EqualJitterBackoff(cap=2.0, base=0.2), retries=30)


def save_request(job: Job, request: FalRequest, ctx: Context) -> bool:
    """Record the request fal created; True unless the job was cancelled meanwhile."""

    def save() -> bool:
        applied, _ = ctx.store.transition(
            job.id,
            JobStatus.submitted,
            from_=HANDLES,
            set_fields={"fal": request.model_dump(mode="json")},
            schedule_at=time.time() + ctx.settings.poll_initial_s,
            event=f"submitted to fal as {request.request_id}",
        )
        if applied:
            return True
        # A try whose answer was lost may have saved it already: then the job holds our id.
        saved = ctx.store.raw_field(job.id, "fal")
        return saved is not None and json.loads(saved).get("request_id") == request.request_id

    def failed(exc: Exception) -> None:
        log.warning("job %s: saving fal request %s failed (%s); trying again", job.id, request.request_id, exc)

    return _SAVE_RETRY.call_with_retry(save, failed)
