"""The Celery tasks, generated from the lifecycle table: one per step that has a queue, each
running its step under the job's lease. The step functions know nothing of Celery."""

from __future__ import annotations

from typing import Any

from config.logging import job_log_context
from lipsync.lifecycle import TASK_STEPS, Step
from workers.app import app
from workers.context import get_context
from workers.runner import resolve, run_step


def register(step: Step) -> Any:
    work = resolve(step.function)

    def task(job_id: str) -> None:
        with job_log_context(job_id):
            run_step(step, job_id, get_context(), work)

    task.__name__ = task.__qualname__ = f"{step.name}_task"
    return app.task(name=step.task_name)(task)


TASKS = {step.name: register(step) for step in TASK_STEPS}
