"""Every applied status change, from every door (worker, poller, gateway, API, CLI): one log line
with the job and fal request ids, the job metrics, and the fal request id on the log lines that
follow. Installed as the job store's observer, so no caller has to remember."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import redis

from config.logging import bind_request_id
from lipsync.jobstore import JobStore
from lipsync.metrics import observe_transition
from lipsync.models import JobStatus
from lipsync.replication import ReplicaAck

log = logging.getLogger("lipsync.metrics")
transition_log = logging.getLogger("lipsync.job")


def observe(
    store: JobStore,
    job_id: str,
    before: JobStatus | None,
    to: JobStatus,
    fields: Mapping[str, Any],
    event: str | None,
    known: Sequence[Any],
) -> None:
    fal = fields.get("fal")
    if isinstance(fal, Mapping) and fal.get("request_id"):
        bind_request_id(job_id, str(fal["request_id"]))
    # One line per status change: with the ids the log context adds, a job's story in the logs.
    transition_log.info(
        "job %s: %s -> %s%s", job_id, before.value if before else "?", to.value, f": {event}" if event else ""
    )
    try:
        observe_transition(store, job_id, before, to, fields, known=known if len(known) == 4 else None)
    except Exception as exc:  # metrics never fail a job
        log.warning("metrics: could not record a transition of job %s: %s: %s", job_id, type(exc).__name__, exc)


def observed_store(client: redis.Redis[bytes], prefix: str, *, ack: ReplicaAck | None = None) -> JobStore:
    """The job store every door writes through: its status changes are logged and counted."""
    return JobStore(client, prefix, observer=observe, ack=ack)
