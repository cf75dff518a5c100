"""A submit whose answer was lost (the connection dropped, or a 5xx naming a request) is reconciled,
never re-POSTed blind: fal's request listing is searched for a request with the job's inputs (their
staging keys, whatever the presigned URL's signature), and a request found is adopted as the job's
one request. Only when fal confirms none exists is the job submitted again, by itself.
The inputs are matched by a fingerprint of the very presigned URLs sent (saved before the POST):
staging keys are content-addressed, so two jobs of the same media share them.

"Not listed" confirms absence only after the request's start timeout (sent as X-Fal-Request-Timeout)
has passed, plus a margin: fal's docs do not say whether requests not ended yet are listed, but a
request not started by then was dropped by fal unbilled, and one that started has ended or is listed.
Where the listing is known to show unfinished requests (the emulator), the margin alone suffices.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from typing import Any

from config.settings import Settings
from lipsync.errors import RetryableError
from lipsync.fal import FalQueueClient
from lipsync.lifecycle import Advance, Fail, Outcome, Wait, backoff
from lipsync.models import FalRequest, Job, JobError, JobStatus
from workers.context import Context
from workers.runner import saved_request_id

log = logging.getLogger("lipsync.worker")
CLAIM_FIELD = "submit_claimed_at"
INPUT_FIELD = "submit_input"


OWNER_KEPT_S = 24 * 3600


def input_fingerprint(arguments: dict[str, Any]) -> str:
    """One POST's whole input, hashed: the presigned URLs carry their own signature, but two jobs of
    the same media presigned within a second share them, so every option counts too."""
    sent = json.dumps(arguments, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(sent.encode()).hexdigest()[:32]


def own_request(ctx: Context, job_id: str, request_id: str) -> bool:
    """Record that the request is this job's; False if another job holds it already."""
    key = ctx.store.keys.fal_request_owner(request_id)
    if ctx.redis.set(key, job_id, nx=True, ex=OWNER_KEPT_S):
        return True
    owner = ctx.redis.get(key)
    return owner is not None and owner.decode() == job_id


def start_timeout(job: Job, settings: Settings, at: float) -> float:
    """X-Fal-Request-Timeout for a submit at `at`: the job's time left to its deadline (fal drops a
    request not started by then, unbilled), at most `fal_start_timeout_s` when that is set."""
    left = max(1.0, job.deadline_at - at)
    return min(left, settings.fal_start_timeout_s) if settings.fal_start_timeout_s > 0 else left


def adopted(job: Job, ctx: Context, request: FalRequest, *, event: str) -> Advance:
    """The job's one fal request, saved whatever happened to this runner's lease meanwhile."""

    def refused() -> None:
        # A try whose answer was lost may have saved it already: then the job holds our id.
        if saved_request_id(ctx, job.id) == request.request_id:
            return
        # Cancelled while the POST was in flight: don't pay for a result nobody wants.
        with contextlib.suppress(Exception):
            ctx.fal.cancel(request)

    fields: dict[str, Any] = {"fal": request.model_dump(mode="json")}
    if job.waiting_on is not None:
        fields["waiting_on"] = None
    return Advance(JobStatus.submitted, fields=fields, event=event, settled=True, if_refused=refused)


def find_request(job: Job, ctx: Context, since: float) -> str | None:
    """The id of the request fal's listing shows for this job's last POST, if any."""
    fingerprint = ctx.store.raw_field(job.id, INPUT_FIELD)
    if fingerprint is None:  # the POST never went out (its fingerprint is saved first)
        return None
    for item in ctx.fal.list_requests(FalQueueClient.listing_url(ctx.settings), since=since):
        arguments = item.get("json_input")
        if isinstance(arguments, str):
            with contextlib.suppress(ValueError):
                arguments = json.loads(arguments)
        # The same input twice (two jobs of the same media and options, presigned in the same
        # second): each job adopts a request of its own.
        if (
            isinstance(arguments, dict)
            and input_fingerprint(arguments) == fingerprint
            and own_request(ctx, job.id, str(item["request_id"]))
        ):
            return str(item["request_id"])
    return None


def lost_submit(job: Job, ctx: Context) -> Outcome:
    store, settings = ctx.store, ctx.settings
    claimed = store.raw_field(job.id, CLAIM_FIELD)
    claimed_at = float(claimed) if claimed else time.time()
    tries = job.attempts.get("reconcile", 0) + 1
    try:
        request_id = find_request(job, ctx, claimed_at)
    except RetryableError as exc:
        wait = backoff(tries, settings.retry_base_s, settings.retry_max_s)
        return Wait(wait, event=f"reconcile: fal's request listing could not be read ({exc.message})",
                    count=("attempts:reconcile",))  # fmt: skip
    if request_id is not None:
        log.warning("job %s: the lost submit made request %s at fal; adopted, not sent again", job.id, request_id)
        event = f"reconciled: fal's listing shows request {request_id} for the lost submit; adopted"
        return adopted(job, ctx, ctx.fal.request_urls(request_id), event=event)
    now = time.time()
    if ctx.store.raw_field(job.id, INPUT_FIELD) is None:
        absent_from = now  # its fingerprint is saved before the POST: without it, nothing was sent
    elif FalQueueClient.listing_lists_unfinished(settings):
        absent_from = claimed_at + settings.fal_listing_grace_s
    else:
        absent_from = claimed_at + start_timeout(job, settings, claimed_at) + settings.fal_listing_grace_s
    if now < absent_from:
        wait = min(absent_from - now, backoff(tries, 1.0, 10.0))
        note = None if tries > 1 else "reconciling a lost submit answer: not in fal's listing yet; looking again"
        return Wait(wait, event=note, count=("attempts:reconcile",))
    if now > job.deadline_at:
        return Fail(JobError(
            code="deadline_exceeded", stage="submit",
            message="cancelled at no cost: the job's deadline passed; fal confirms its lost submit made no request",
        ))  # fmt: skip
    store.note(job.id, delete=[CLAIM_FIELD])
    log.warning("job %s: fal confirms the lost submit made no request; submitting again", job.id)
    return Wait(0.05, event="fal confirms the lost submit made no request (not listed after its start timeout); "
                "submitting again")  # fmt: skip
