"""A job's lifecycle, declared once: the steps, each with its queue, the statuses it handles, its
lease, its time limit and its function; and the outcomes a step returns.

Everything else is generated from this table: Celery's routes, time limits and task
registration (`config.celery`, `workers.tasks`), the dispatcher's choice of the next task,
the producer's first message. A step does its work and returns an outcome (`Advance`, `Wait`
or `Fail`); the runner (`workers.runner`) writes it in one atomic operation.

    queued ─stage─▶ submitting ─submit─▶ submitted/in_queue/in_progress ─wait─▶ storing ─store─▶ completed
                                                                      (poller)            (+ callback)
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from config.settings import Settings
from lipsync.models import AT_FAL_STATUSES, TERMINAL_STATUSES, JobError, JobStatus

TASK_QUEUES = ("transfer", "api")
# The Celery app the workers run, by name: doors (CLI, gateway) start it without importing it.
CELERY_APP = "workers.app"


def transfer_limit_s(settings: Settings) -> int:
    """Every transfer may take long (a 2 GB download): its limit covers fetch + upload."""
    return int(settings.fetch_timeout_s * 2 + 600)


@dataclass(frozen=True)
class Step:
    name: str
    # The Celery queue its task runs on; None for the wait, which is the poller's, not a task.
    queue: str | None
    handles: frozenset[JobStatus]
    # How long a runner holds the job: a runner killed mid-step is covered again after this.
    lease_s: Callable[[Settings], float]
    # Celery's hard time limit of the task (the soft limit is a little less).
    time_limit_s: Callable[[Settings], int]
    # "module:function", resolved where the step runs (lipsync cannot import workers).
    function: str
    # The status the job shows while the step works on it (and the counter of those visits).
    working: JobStatus | None = None
    counter: str | None = None
    # Run at once by the worker that wrote the step before it, which hands it its lease in the
    # same write (one broker hop, one task and one `begin` less), rather than sent to its queue;
    # its queue still takes it when it comes from elsewhere (the schedule's safety net, a wake
    # from the fair queue, a retry).
    inline: bool = False

    @property
    def task_name(self) -> str:
        return f"lipsync.{self.name}"


STEPS: tuple[Step, ...] = (
    Step(
        "stage", "transfer", frozenset({JobStatus.queued, JobStatus.staging}),
        lease_s=lambda s: s.transfer_lease_s, time_limit_s=transfer_limit_s,
        function="workers.stage:stage", working=JobStatus.staging, counter="attempts:stage",
    ),
    Step(
        "submit", "api", frozenset({JobStatus.submitting}),
        lease_s=lambda s: s.poll_lease_s, time_limit_s=lambda s: 120, function="workers.submit:submit",
        inline=True,
    ),
    Step(
        "wait", None, AT_FAL_STATUSES,
        lease_s=lambda s: s.poll_lease_s, time_limit_s=lambda s: 60, function="lipsync.poller:Poller",
    ),
    Step(
        "store", "transfer", frozenset({JobStatus.storing}),
        lease_s=lambda s: s.transfer_lease_s, time_limit_s=transfer_limit_s, function="workers.store:store",
    ),
    Step(
        "callback", "api", TERMINAL_STATUSES,
        lease_s=lambda s: s.poll_lease_s, time_limit_s=lambda s: 120, function="workers.callback:deliver",
    ),
)  # fmt: skip

# A step run in place is handed the lease of the step before it, without `begin`: so it has no
# working status or counter of its own to mark.
assert all(s.working is None and s.counter is None for s in STEPS if s.inline), "an inline step marks nothing"

BY_NAME: dict[str, Step] = {step.name: step for step in STEPS}
# The step a job in each status needs next (ended jobs need none; their callback has its own list).
NEXT: dict[JobStatus, Step] = {status: step for step in STEPS if step.name != "callback" for status in step.handles}
TASK_STEPS: tuple[Step, ...] = tuple(step for step in STEPS if step.queue is not None)


def step(name: str) -> Step:
    return BY_NAME[name]


def next_step(status: JobStatus) -> Step | None:
    return NEXT.get(status)


def queue_of(name: str) -> str:
    queue = BY_NAME[name].queue
    assert queue is not None, f"step {name} is not a Celery task"
    return queue


# Outcomes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Advance:
    """The job moves on to `to`, with these fields written and this event told."""

    to: JobStatus
    fields: Mapping[str, Any] = field(default_factory=dict)
    event: str | None = None
    count: tuple[str, ...] = ()
    # Records something that already happened outside (fal created a request): written even if
    # this runner's lease lapsed meanwhile, and ridden through a Redis restart.
    settled: bool = False
    # Called when the write is refused (the job was cancelled meanwhile).
    if_refused: Callable[[], None] | None = None


@dataclass(frozen=True)
class Wait:
    """Look at the job again in `seconds`; meanwhile it holds no worker."""

    seconds: float
    to: JobStatus | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)
    event: str | None = None
    count: tuple[str, ...] = ()


@dataclass(frozen=True)
class Fail:
    """The job ends failed, in words."""

    error: JobError


# None: the step wrote what it had to itself (a callback's bookkeeping); only the lease is given back.
Outcome = Advance | Wait | Fail | None


def backoff(attempt: int, initial: float, cap: float) -> float:
    """Exponential backoff with jitter: about initial·2^(attempt-1), at most `cap`."""
    base = min(cap, initial * (2 ** max(0, attempt - 1)))
    return float(base * random.uniform(0.75, 1.25))
