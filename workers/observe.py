"""The worker's view of the job store: every applied status change is logged (one line, with the job
and fal request ids), feeds the job metrics, and puts the fal request id on the log lines that
follow. One place, so no stage has to remember."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from config.logging import bind_request_id
from lipsync.jobstore import JobStore
from lipsync.metrics import observe_transition
from lipsync.models import Job, JobStatus

log = logging.getLogger("lipsync.metrics")
transition_log = logging.getLogger("lipsync.job")


class ObservedJobStore(JobStore):
    def get(self, job_id: str) -> Job:
        job = super().get(job_id)
        if job.fal is not None:
            bind_request_id(job_id, job.fal.request_id)
        return job

    def transition(self, job_id: str, to: JobStatus | None, **options: Any) -> tuple[bool, JobStatus | None]:
        applied, before = super().transition(job_id, to, **options)
        if not applied:
            return applied, before
        set_fields: Mapping[str, Any] = options.get("set_fields") or {}
        fal = set_fields.get("fal")
        if isinstance(fal, Mapping) and fal.get("request_id"):
            bind_request_id(job_id, str(fal["request_id"]))
        if to is not None and to is not before:
            # One line per status change: with the ids the log context adds, a job's story in the logs.
            event = options.get("event")
            transition_log.info(
                "job %s: %s -> %s%s", job_id, before.value if before else "?", to.value, f": {event}" if event else ""
            )
        try:
            observe_transition(self, job_id, before, to, set_fields)
        except Exception as exc:  # metrics never fail a job
            log.warning("metrics: could not record a transition of job %s: %s: %s", job_id, type(exc).__name__, exc)
        return applied, before
