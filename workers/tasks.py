"""The Celery tasks: each loads nothing itself, runs one stage under the job's lease, and sends
the job on. The stage functions know nothing of Celery."""

from __future__ import annotations

from config.logging import job_log_context
from lipsync.models import JobStatus
from workers import callback, poll, stage, store, submit
from workers.app import app
from workers.context import get_context
from workers.runner import QUEUE_OF, StageFunction, run_stage

STAGES: dict[str, tuple[frozenset[JobStatus], StageFunction]] = {
    "stage": (stage.HANDLES, stage.stage),
    "submit": (submit.HANDLES, submit.submit),
    "poll": (poll.HANDLES, poll.poll),
    "store": (store.HANDLES, store.store),
}


def send(task: str, job_id: str) -> None:
    """Broker messages carry the job id and nothing else."""
    app.send_task(f"lipsync.{task}", args=[job_id], queue=QUEUE_OF[task])


def advance(name: str, job_id: str) -> None:
    handles, work = STAGES[name]
    with job_log_context(job_id):
        next_task = run_stage(name, job_id, get_context(), handles, work)
    if next_task is not None:
        send(next_task, job_id)


@app.task(name="lipsync.stage")
def stage_task(job_id: str) -> None:
    advance("stage", job_id)


@app.task(name="lipsync.submit")
def submit_task(job_id: str) -> None:
    advance("submit", job_id)


@app.task(name="lipsync.poll")
def poll_task(job_id: str) -> None:
    advance("poll", job_id)


@app.task(name="lipsync.store")
def store_task(job_id: str) -> None:
    advance("store", job_id)


@app.task(name="lipsync.callback")
def callback_task(job_id: str) -> None:
    callback.deliver(job_id, get_context())
