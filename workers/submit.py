"""Submit: the account's breaker, admission (adaptive in-flight cap, submit rate), one POST to fal,
request_id saved at once.

A job never has two fal requests. The submit claim is written before the POST; a runner that
finds a claim but no request id knows an earlier POST may have reached fal, and reconciles
(`lipsync.reconcile`): it adopts the request fal's listing shows for the job's inputs, or, once
fal confirms there is none, submits again by itself. The request id is an
`Advance(settled=True)`: written even if this runner's lease lapsed meanwhile, riding out a
Redis restart. A locked account or refused key pauses the job (`lipsync.account`), never fails it.
A job refused for a full cap waits `admission_recheck_s` (a safety net): the poller's dispatch
reserves a freed slot for it when its turn comes and sends its submit, which finds the slot held.
"""

from __future__ import annotations

import logging
import time

import redis
from redis.backoff import EqualJitterBackoff
from redis.retry import Retry

from lipsync.account import AccountState
from lipsync.errors import PermanentError, RetryableError
from lipsync.fal import AccountRefused, SubmitOutcomeUnknown
from lipsync.lifecycle import Advance, Outcome, Wait
from lipsync.models import FalPriority, FalRequest, Job, JobStatus, Priority
from lipsync.replication import ReplicaAckTimeout
from workers import reconcile
from workers.context import Context
from workers.reconcile import adopted
from workers.runner import Lease

log = logging.getLogger("lipsync.worker")
CLAIM_FIELD = reconcile.CLAIM_FIELD


def submit(job: Job, ctx: Context, lease: Lease) -> Outcome:
    store, settings = ctx.store, ctx.settings
    if job.fal is not None:  # a redelivered submit whose job already has its request
        return Advance(JobStatus.submitted, event="already submitted")
    if time.time() > job.deadline_at:
        if store.raw_field(job.id, CLAIM_FIELD) is not None:  # an earlier POST may have reached fal
            return reconcile.lost_submit(job, ctx)
        raise PermanentError(
            "cancelled at no cost: the job's deadline passed while it waited with us, before it was sent to fal",
            code="deadline_exceeded",
        )
    pause, account = ctx.account.may_submit()
    if pause > 0 and account is not None:
        return _wait_on_account(job, account.waiting_on, pause)
    video, audio = job.inputs["video"], job.inputs["audio"]
    ttl = int(max(settings.presign_ttl_s, job.deadline_at - time.time() + 3600))
    arguments = job.request.model_dump(mode="json", exclude_none=True)
    arguments["video_url"] = ctx.storage.presign_get(video.staging_key, ttl)
    arguments["audio_url"] = ctx.storage.presign_get(audio.staging_key, ttl)
    # The slot and the claim are taken in one call, before the POST; with the claim, what
    # identifies this POST's request in fal's listing, should its answer be lost.
    admission = ctx.admission.admit(
        job.id, claim=CLAIM_FIELD, status=JobStatus.submitting.value, priority=job.priority, tenant=job.tenant,
        with_claim=(reconcile.INPUT_FIELD, reconcile.input_fingerprint(arguments)),
    )  # fmt: skip
    if account is not None and not admission.admitted:
        ctx.account.release_probe()  # e.g. the slot went to the job whose turn it is: it probes now
    if admission.claimed_before:
        return reconcile.lost_submit(job, ctx)
    if admission.refused:
        return None  # cancelled meanwhile: nothing to send
    if admission.wake is not None:  # the slot went to the job whose turn it is: wake it now
        try:
            ctx.send("submit", admission.wake)
        except Exception as exc:  # its schedule entry wakes it a little later
            log.warning("job %s: could not wake %s: %s", job.id, admission.wake, exc)
    if not admission.admitted:
        return Wait(max(0.05, admission.retry_after))
    unconfirmed = confirm_claim(job, ctx)
    if unconfirmed is not None:
        return unconfirmed
    webhook = f"{settings.fal_webhook_url.rstrip('/')}/{job.id}" if settings.fal_webhook_url else None
    try:
        request = ctx.fal.submit(
            arguments,
            marker=job.id,
            webhook_url=webhook,
            priority=job.fal_priority or (FalPriority.low if job.priority is Priority.low else None),
            start_timeout_s=reconcile.start_timeout(job, settings, time.time()),
        )
    except AccountRefused as exc:
        # Nothing was created, and no attempt is counted against the job: the account, not the job.
        store.note(job.id, delete=[CLAIM_FIELD], raw={"attempts:submit": str(job.attempts.get("submit", 0))})
        delay = ctx.account.refused(exc.message)
        state = ctx.account.state()
        return _wait_on_account(job, state.waiting_on if state else exc.message, delay)
    except SubmitOutcomeUnknown as exc:
        # The claim stays: the next run reconciles (the listing, a webhook) before anything is sent.
        log.warning("job %s: %s", job.id, exc.message)
        return Wait(1.0, event=f"reconciling: {exc.message}")
    except RetryableError:
        # Proven not created (connect error, 429, 5xx before fal's queue): free to try again
        # (the runner's write of this retry gives the slot back).
        store.note(job.id, delete=[CLAIM_FIELD])
        raise
    if account is not None:  # this submit was the probe, and fal took it
        ctx.account.accepted()
    # No lost answer of the same input may adopt it. Like the save that follows, this rides out a
    # Redis blip in place, naming the paid request in the log while it waits.
    _SAVE_RETRY.call_with_retry(
        lambda: reconcile.own_request(ctx, job.id, request.request_id),
        lambda exc: log.warning(
            "job %s: recording fal request %s failed (%s); trying again", job.id, request.request_id, exc
        ),
    )
    return adopted(job, ctx, request, event=f"submitted to fal as {request.request_id}")


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
# As the runner's settled write of the request id (workers.runner): about 40 s through a Redis restart.
_SAVE_RETRY = Retry(EqualJitterBackoff(cap=2.0, base=0.2), retries=30)
# Taking the claim back rides out the failover that lost its acknowledgement (about 20 s).
_CLAIM_RETRY = Retry(EqualJitterBackoff(cap=1.0, base=0.1), retries=30)


def _wait_on_account(job: Job, waiting_on: str, seconds: float) -> Wait:
    if job.waiting_on == waiting_on:
        return Wait(seconds)
    return Wait(seconds, fields={"waiting_on": waiting_on}, event=f"waiting on {waiting_on}; not counted as an attempt")


__all__ = ["CLAIM_FIELD", "AccountState", "FalRequest", "adopted", "submit"]
