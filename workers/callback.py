"""Callback: tell the tenant a job ended, by POSTing the job to its `callback_url`, signed.

The job store queues the callback in the same script that ends the job (the `callbacks`
sorted set), the dispatcher turns due entries into `lipsync.callback` tasks on the `api`
queue, and this step makes one attempt per visit, under the job's lease: delivered, or back in the set after a
backoff, or given up after `callback_max_attempts`. Every attempt is an event on the job.
"""

from __future__ import annotations

import json
import logging
import time

from lipsync.callbacks import CallbackSender
from lipsync.errors import PermanentError, RetryableError
from lipsync.lifecycle import backoff
from lipsync.models import Job
from lipsync.public import public_job
from lipsync.tenants import TenantNotFound, TenantStore
from workers.context import Context
from workers.runner import Lease

log = logging.getLogger("lipsync.callback")

_sender: CallbackSender | None = None


def sender(ctx: Context) -> CallbackSender:
    global _sender
    if _sender is None or _sender.fetcher is not ctx.fetcher:
        _sender = CallbackSender(ctx.fetcher, timeout_s=ctx.settings.callback_timeout_s)
    return _sender


def deliver(job: Job, ctx: Context, lease: Lease) -> None:
    """One attempt at the job's callback (an ended job: the runner's `begin` checked)."""
    store, settings, job_id = ctx.store, ctx.settings, job.id
    if not job.callback_url or not job.tenant:
        store.redis.zrem(store.callbacks_key, job_id)
        return
    try:
        secret = TenantStore(ctx.redis, settings.key_prefix).get(job.tenant).callback_secret
    except TenantNotFound:
        store.redis.zrem(store.callbacks_key, job_id)
        store.note(job_id, event=f"callback not sent: tenant {job.tenant!r} no longer exists")
        return
    view = public_job(job)
    if view.output is not None:
        key = view.output.url.split("/", 3)[3]
        view.output.presigned_url = ctx.storage.presign_get(key, settings.presign_ttl_s)
    body = json.dumps(view.model_dump(mode="json"), separators=(",", ":")).encode()
    delivery_id = f"{job.id}:{job.status.value}:{job.timestamps.get(job.status.value, job.updated_at):.6f}"
    # Attempts are counted per delivery: a job retried and ended again gets a full set.
    previous = (
        store.raw_field(job_id, "callback_attempt")
        if store.raw_field(job_id, "callback_delivery") == delivery_id
        else None
    )
    attempt = int(previous or 0) + 1
    progress = {"callback_delivery": delivery_id, "callback_attempt": str(attempt)}
    give_up = attempt >= settings.callback_max_attempts
    try:
        status = sender(ctx).post(job.callback_url, body, secret.get_secret_value(), delivery_id)
        delivered = 200 <= status < 300
        outcome = f"HTTP {status}"
    except PermanentError as exc:  # the URL is refused by the guarded fetcher's rules
        delivered, outcome, give_up = False, exc.message, True
    except RetryableError as exc:
        delivered, outcome = False, exc.message
    if delivered or give_up:
        store.redis.zrem(store.callbacks_key, job_id)
        event = (
            f"callback {attempt} delivered: {outcome}"
            if delivered
            else f"callback {attempt} failed: {outcome}; given up"
        )
        if not delivered:
            log.warning("job %s: callback given up after %d attempts: %s", job_id, attempt, outcome)
    else:
        wait = backoff(attempt, settings.callback_retry_base_s, settings.callback_retry_max_s)
        store.redis.zadd(store.callbacks_key, {job_id: time.time() + wait})
        event = f"callback {attempt} failed: {outcome}; next in {wait:.1f}s"
    store.note(job_id, raw=progress, count=["attempts:callback"], event=event)
