"""Poll: one status call per visit; between visits the job is only an entry in the schedule.

COMPLETED fetches the result at once (fal keeps large results only minutes) and hands the
job to store; COMPLETED with an error fails the job with fal's own words; the deadline is
enforced by cancelling at fal.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from lipsync.errors import FalError, PermanentError
from lipsync.fal import QueueState
from lipsync.models import AT_FAL_STATUSES, FalLog, File, Job, JobError, JobStatus, LipsyncOutput
from workers.context import Context
from workers.runner import Lease, backoff

HANDLES = AT_FAL_STATUSES
LOG_TAIL = 20


def poll(job: Job, ctx: Context, lease: Lease) -> str | None:
    assert job.fal is not None, "a job at fal always has its request"
    store, settings = ctx.store, ctx.settings
    if time.time() > job.deadline_at:
        raise PermanentError(
            f"fal did not finish before the job's deadline ({settings.job_deadline_s:.0f} s); "
            "the request was cancelled at fal",
            code="deadline_exceeded",
        )
    status = ctx.fal.status(job.fal, with_logs=True)
    polls = job.attempts.get("poll", 0) + 1
    if status.state is not QueueState.completed:
        to = JobStatus.in_queue if status.state is QueueState.in_queue else JobStatus.in_progress
        fal = job.fal.model_copy(update={"queue_position": status.queue_position})
        fields: dict[str, object] = {"fal": fal.model_dump(mode="json")}
        if status.logs:
            fields["logs"] = [entry.model_dump(mode="json") for entry in status.logs[-LOG_TAIL:]]
        wait = backoff(polls, settings.poll_initial_s, settings.poll_max_s)
        store.transition(
            job.id,
            to,
            from_=HANDLES,
            set_fields=fields,
            incr={"attempts:poll": 1},
            schedule_at=time.time() + wait,
            event=None if to is job.status else f"fal reports {status.state.value}",
        )
        return None
    if status.error:
        raise FalError(
            f"fal could not process the request: {status.error}"
            + (f" ({status.error_type})" if status.error_type else ""),
            error_type=status.error_type,
        )
    body = ctx.fal.result(job.fal)
    applied = accept_result(job, ctx, body, via="poll", inference_time=status.inference_time, logs=status.logs)
    return "store" if applied else None


def accept_result(
    job: Job,
    ctx: Context,
    body: dict[str, Any],
    *,
    via: str,
    inference_time: float | None = None,
    logs: Sequence[FalLog] = (),
) -> bool:
    """Record fal's output and hand the job to store. True for the one caller that got here first.

    Both a poll and a fal webhook (`via`) end here; the store's atomic `from_` transition lets
    exactly one of them through, so the output is stored once whichever arrives first.
    """
    assert job.fal is not None, "a job at fal always has its request"
    output = LipsyncOutput.model_validate(body)
    fal = job.fal.model_copy(
        update={"inference_time": inference_time, "output": File.model_validate(output.video.model_dump())}
    )
    applied, _ = ctx.store.transition(
        job.id,
        JobStatus.storing,
        from_=HANDLES,
        set_fields={
            "fal": fal.model_dump(mode="json"),
            **({"logs": [e.model_dump(mode="json") for e in logs[-LOG_TAIL:]]} if logs else {}),
        },
        incr={f"attempts:{via}": 1},
        schedule_at=time.time() + ctx.settings.transfer_lease_s,
        event=f"fal completed (by {via}); storing the output",
    )
    ctx.admission.release(job.id)
    return applied


def reject_result(job: Job, ctx: Context, error: JobError, *, via: str) -> bool:
    """fal finished the request with an error: fail the job in fal's words, once."""
    applied, _ = ctx.store.transition(
        job.id,
        JobStatus.failed,
        from_=HANDLES,
        set_fields={"error": error.model_dump(mode="json")},
        incr={f"attempts:{via}": 1},
        event=f"failed (by {via}): {error.code}: {error.message}",
    )
    ctx.admission.release(job.id)
    return applied
