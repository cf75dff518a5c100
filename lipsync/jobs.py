"""What any door may do to a job once it exists, the same way from the gateway, the Python API, the
CLI and the workers: finish it with fal's result or fal's error (a poll or a webhook), cancel it,
retry it, and hand it to its next step. Writes go through the observed job store, so each is
logged and counted wherever it came from."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from config.settings import Settings
from lipsync import lifecycle
from lipsync.errors import InputDownloadFailed, InvalidTransition
from lipsync.fal import FalQueueClient
from lipsync.jobstore import JobStore
from lipsync.models import AT_FAL_STATUSES, FalLog, FalRequest, File, Job, JobError, JobStatus, LipsyncOutput
from lipsync.storage import Storage

log = logging.getLogger("lipsync.jobs")

LOG_TAIL = 20
# Resubmissions after fal could not download the job's inputs (bounded by `fal_download_resubmits`).
DOWNLOAD_RESUBMITS = "attempts:input_download"
# Fields a retry clears: the job starts over from staging with a fresh deadline.
RETRY_CLEARS = (
    "fal", "error", "output", "submit_claimed_at", "submit_input", "logs", "lease_owner", "lease_until",
    DOWNLOAD_RESUBMITS, *(f"attempts:retry_{step.name}" for step in lifecycle.STEPS),
)  # fmt: skip
# Fields a resubmission clears: the request fal ended without running the model, and its submit's claim.
RESUBMIT_CLEARS = ("fal", "submit_claimed_at", "submit_input")

# Sends "look at job X now" to a step's queue: (step name, job id).
Sender = Callable[[str, str], None]


def celery_sender(app: Any) -> Sender:
    """A sender over a Celery app. Broker messages carry the job id and nothing else."""

    def send(step_name: str, job_id: str) -> None:
        step = lifecycle.step(step_name)
        app.send_task(step.task_name, args=[job_id], queue=lifecycle.queue_of(step.name))

    return send


def finish_with_result(
    store: JobStore,
    job_id: str,
    request: FalRequest,
    body: dict[str, Any],
    *,
    via: str,
    transfer_lease_s: float,
    inference_time: float | None = None,
    logs: Sequence[FalLog] = (),
) -> bool:
    """Record fal's output and hand the job to store. True for the one caller that got here first.

    A poll and a fal webhook (`via`) both end here; the write's `from_` lets exactly one of
    them through, so the output is stored once whichever arrives first. The job leaves fal,
    so its admission slot is freed in the same write.
    """
    output = LipsyncOutput.model_validate(body)
    fal = request.model_copy(
        update={"inference_time": inference_time, "output": File.model_validate(output.video.model_dump())}
    )
    fields: dict[str, Any] = {"fal": fal.model_dump(mode="json")}
    if logs:
        fields["logs"] = [entry.model_dump(mode="json") for entry in logs[-LOG_TAIL:]]
    return store.advance(
        job_id,
        JobStatus.storing,
        from_=AT_FAL_STATUSES,
        fields=fields,
        count=[] if via == "poll" else [f"attempts:{via}"],  # the poller counts a check when it claims it
        due_at=time.time() + transfer_lease_s,
        event=f"fal completed (by {via}); storing the output",
    ).applied


def finish_with_error(store: JobStore, job_id: str, error: JobError, *, via: str) -> bool:
    """fal finished the request with an error: fail the job in fal's words, once."""
    count = [] if via == "poll" else [f"attempts:{via}"]
    return store.fail(job_id, error, from_=AT_FAL_STATUSES, count=count, by=via).applied


def staged_inputs_missing(storage: Storage, job: Job) -> list[str]:
    """The job's staged inputs that are gone from our S3 (heads each one). Raises RetryableError
    when S3 cannot be reached from here either."""
    return [name for name, staged in sorted(job.inputs.items()) if storage.head(staged.staging_key) is None]


def after_input_download_failure(
    store: JobStore,
    settings: Settings,
    job_id: str,
    failure: InputDownloadFailed,
    *,
    resubmits: int,
    deadline_at: float,
    via: str,
    missing: Sequence[str] = (),
) -> JobStatus | None:
    """fal could not download the job's inputs (`file_download_error`): the model never ran, and the
    inputs are ours and fine, so a blip of our own S3 must not cost the job. It is submitted again with
    fresh presigned URLs after a backoff, at most `fal_download_resubmits` times and while the deadline
    leaves time; then it fails in words (`input_download_failed`). `missing`: staged inputs found gone
    from S3, which no resubmission can bring back. Returns where the job went (None: another door first)."""
    now = time.time()
    delay = lifecycle.backoff(resubmits + 1, settings.fal_download_backoff_s, settings.fal_download_backoff_max_s)
    what = f"{failure.input_name}: {failure.fal_message}"
    bound = settings.fal_download_resubmits
    if not missing and resubmits < bound and now + delay < deadline_at:
        event = (
            f"fal could not download the inputs ({what}); submitting again in {delay:.0f} s "
            f"with fresh URLs (resubmission {resubmits + 1} of {bound})"
        )
        log.warning("job %s: %s", job_id, event)
        moved = store.resubmit(
            job_id, from_=AT_FAL_STATUSES, clear=RESUBMIT_CLEARS, event=event, due_at=now + delay,
            count=[DOWNLOAD_RESUBMITS],
        )  # fmt: skip
        return JobStatus.submitting if moved.applied else None
    if missing:
        why = f"; the staged {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} gone from our S3"
    elif resubmits >= bound:
        why = f", {resubmits + 1} times (submitted again {resubmits} times with fresh URLs)"
    else:
        why = "; the job's deadline leaves no time to submit it again"
    error = JobError(
        code=failure.code,
        message=f"fal could not download the inputs from our S3 ({what}){why}. The model never ran on it. "
        "Check that the staging bucket is reachable from fal, then `lipsync retry` the job.",
        fal_error_type=failure.error_type,
        stage=via,
    )
    return JobStatus.failed if finish_with_error(store, job_id, error, via=via) else None


def cancel(store: JobStore, settings: Settings, job_id: str, *, by: str = "the producer") -> Job:
    """Cancel a job not yet ended; a request at fal is cancelled there too (we'd pay for nothing)."""
    job = store.get(job_id)
    if job.terminal:
        raise InvalidTransition(f"job {job_id} is already {job.status.value}; nothing to cancel")
    moved = store.cancel(job_id, event=f"cancelled by {by}")
    if not moved.applied:
        raise InvalidTransition(f"job {job_id} is already {moved.before}; nothing to cancel")
    job = store.get(job_id)
    if job.fal is not None and moved.before in AT_FAL_STATUSES | {JobStatus.submitting}:
        cancel_at_fal(store, settings, job)
    return job


def cancel_at_fal(store: JobStore, settings: Settings, job: Job, fal: FalQueueClient | None = None) -> None:
    """Best effort: the job is ended in our books either way."""
    assert job.fal is not None
    client = fal or FalQueueClient(
        queue_url=settings.fal_queue_url, app=settings.fal_app, key=settings.fal_key, timeout_s=settings.http_timeout_s
    )
    try:
        outcome = client.cancel(job.fal)
        store.note(job.id, event=f"fal cancel: {outcome.value}")
    except Exception as exc:
        log.warning("job %s: could not cancel at fal: %s", job.id, exc)
    finally:
        if fal is None:
            client.close()


# Store failures that say fal's copy is gone or bad: storing it again cannot help.
_OUTPUT_LOST = frozenset({"output_unavailable", "bad_output"})


def result_retained(job: Job, settings: Settings, now: float) -> bool:
    """fal's output is known and fal's CDN still keeps it (the lifetime we ask for, else fal's hour)."""
    if job.fal is None or job.fal.output is None or job.error is None:
        return False
    if job.error.stage != "store" or job.error.code in _OUTPUT_LOST:
        return False
    known_at = job.timestamps.get("storing")
    kept_s = settings.fal_output_lifecycle_s or 3600.0
    return known_at is not None and now < known_at + kept_s - 60


def retry(store: JobStore, settings: Settings, job_id: str, send: Sender, *, by: str = "the producer") -> Job:
    """Start a failed or cancelled job over, from staging, with a fresh deadline."""
    job = store.get(job_id)
    if job.status not in (JobStatus.failed, JobStatus.cancelled):
        raise InvalidTransition(f"job {job_id} is {job.status.value}; only failed or cancelled jobs can be retried")
    now = time.time()
    if result_retained(job, settings, now):
        # fal's result is known and fal still keeps it: store it again, never pay for it again.
        moved = store.store_again(
            job_id,
            from_=[JobStatus.failed],
            fields={"deadline_at": now + settings.job_deadline_s},
            clear=[name for name in RETRY_CLEARS if name not in ("fal", "logs", "submit_claimed_at", "submit_input")],
            event=f"retried by {by}: fal's result is still kept, so it is stored again (not paid again)",
        )
        if moved.applied:
            send("store", job_id)
            return store.get(job_id)
    moved = store.requeue(
        job_id,
        from_=[JobStatus.failed, JobStatus.cancelled],
        fields={"deadline_at": now + settings.job_deadline_s},
        clear=RETRY_CLEARS,
        due_at=now + settings.transfer_lease_s,
        event=f"retried by {by} (was {job.status.value})",
    )
    if not moved.applied:
        raise InvalidTransition(f"job {job_id} is {moved.before}; only failed or cancelled jobs can be retried")
    send("stage", job_id)
    return store.get(job_id)
