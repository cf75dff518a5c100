"""Submit: admission (global in-flight cap, submit rate), one POST to fal, request_id saved at once.

A job never has two fal requests. The submit claim is written before the POST; a runner that
finds a claim but no request id knows an earlier POST may have reached fal and fails the
job in words instead of paying twice. The request id is an `Advance(settled=True)`: written
even if this runner's lease lapsed meanwhile, riding out a Redis restart.
"""

from __future__ import annotations

import contextlib
import logging
import time

import redis
from redis.backoff import EqualJitterBackoff
from redis.retry import Retry

from lipsync.errors import PermanentError, RetryableError
from lipsync.fal import SubmitOutcomeUnknown
from lipsync.lifecycle import Advance, Outcome, Wait
from lipsync.models import FalRequest, Job, JobStatus
from lipsync.replication import ReplicaAckTimeout
from workers.context import Context
from workers.runner import Lease, saved_request_id

log = logging.getLogger("lipsync.worker")
CLAIM_FIELD = "submit_claimed_at"


def submit(job: Job, ctx: Context, lease: Lease) -> Outcome:
    store, settings = ctx.store, ctx.settings
    if job.fal is not None:  # a redelivered submit whose job already has its request
        return Advance(JobStatus.submitted, event="already submitted")
    if time.time() > job.deadline_at:
        raise PermanentError("the job's deadline passed before it could be submitted", code="deadline_exceeded")
    # The slot and the claim are taken in one call, before the POST.
    admission = ctx.admission.admit(job.id, claim=CLAIM_FIELD, status=JobStatus.submitting.value)
    if admission.claimed_before:
        raise SubmitOutcomeUnknown(
            "an earlier submit of this job was interrupted after it was sent to fal (the worker "
            "stopped or lost its answer); fal may have created a request, so it was not sent "
            "again to avoid paying twice. `lipsync retry` submits it anew."
        )
    if admission.refused:
        return None  # cancelled meanwhile: nothing to send
    if not admission.admitted:
        return Wait(max(0.05, admission.retry_after))
    unconfirmed = confirm_claim(job, ctx)
    if unconfirmed is not None:
        return unconfirmed
    video, audio = job.inputs["video"], job.inputs["audio"]
    ttl = int(max(settings.presign_ttl_s, job.deadline_at - time.time() + 3600))
    arguments = job.request.model_dump(mode="json", exclude_none=True)
    arguments["video_url"] = ctx.storage.presign_get(video.staging_key, ttl)
    arguments["audio_url"] = ctx.storage.presign_get(audio.staging_key, ttl)
    webhook = f"{settings.fal_webhook_url.rstrip('/')}/{job.id}" if settings.fal_webhook_url else None
    try:
        request = ctx.fal.submit(arguments, marker=job.id, webhook_url=webhook, priority=job.fal_priority)
    except RetryableError:
        # Proven not created (connect error, 429, 5xx before fal's queue): free to try again
        # (the runner's write of this retry gives the slot back).
        store.note(job.id, delete=[CLAIM_FIELD])
        raise

    def refused() -> None:
        # A try whose answer was lost may have saved it already: then the job holds our id.
        if saved_request_id(ctx, job.id) == request.request_id:
            return
        # Cancelled while the POST was in flight: don't pay for a result nobody wants.
        with contextlib.suppress(Exception):
            ctx.fal.cancel(request)

    return Advance(
        JobStatus.submitted,
        fields={"fal": request.model_dump(mode="json")},
        event=f"submitted to fal as {request.request_id}",
        settled=True,
        if_refused=refused,
    )


def confirm_claim(job: Job, ctx: Context) -> Wait | None:
    """The claim must survive a Redis failover before the POST: acknowledged by the replicas
    (`redis_min_replicas_ack`), or nothing is sent. A claim not acknowledged is taken back and
    the job waits (the runner's write gives the slot back; a wait is not a retry, so an outage
    of the replicas fails no job), so that the next try is a fresh submit, not mistaken for an
    interrupted POST."""
    try:
        if ctx.store.confirm(job.id, [CLAIM_FIELD]):
            return None
        problem = "its submit claim was lost in a Redis failover"
    except (ReplicaAckTimeout, redis.ConnectionError, redis.TimeoutError) as exc:
        problem = f"its submit claim is not known to be on a replica ({exc})"
        _CLAIM_RETRY.call_with_retry(lambda: ctx.store.note(job.id, delete=[CLAIM_FIELD]), lambda _: None)
    log.warning("job %s: not sent to fal: %s; trying again in %.0f s", job.id, problem, _UNCONFIRMED_WAIT_S)
    return Wait(_UNCONFIRMED_WAIT_S, event=f"not sent to fal: {problem}")


_UNCONFIRMED_WAIT_S = 1.0
# Taking the claim back rides out the failover that lost its acknowledgement (about 20 s).
_CLAIM_RETRY = Retry(EqualJitterBackoff(cap=1.0, base=0.1), retries=30)

__all__ = ["CLAIM_FIELD", "FalRequest", "submit"]
