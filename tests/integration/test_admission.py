"""The global in-flight cap holds across worker processes, every slot comes back, and a freed slot
goes at once to the job whose turn it is (waiting jobs do not spin).

A stack of its own next to the session's (its own Redis database for broker and job store, its
own key prefix), so that only these workers, with `LIPSYNC_MAX_IN_FLIGHT=3`, take its jobs:
two api worker processes share the cap. What is at fal is read at fal (the emulator's queued
and running requests), not from our own bookkeeping. The fair queue's choices (dispatch,
a tenant's credit) are read off the admission script itself, against a real Redis.
"""

from __future__ import annotations

import re
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from lipsync.admission import WAKE_BACKUP_S, AdmissionControl
from lipsync.jobstore import JobStore
from lipsync.models import AT_FAL_STATUSES, FalRequest, Job, JobStatus, LipsyncInput
from producers.devstack import WorkerSpec
from tests.conftest import Workers
from tests.fixtures.isolated import settings_from

CAP = 3
# The safety-net recheck of a job refused for a full cap, far beyond the test's time: only the
# dispatch of freed slots can admit the batch's later jobs in time.
RECHECK_S = 600


class AtFal:
    """Samples how many requests fal holds (queued or running) and keeps the highest."""

    def __init__(self, emulator: Any) -> None:
        self.emulator = emulator
        self.highest = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> AtFal:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            counters = self.emulator.counters()
            self.highest = max(self.highest, counters["in_queue"] + counters["in_progress"])
            self._stop.wait(0.05)


@pytest.fixture
def capped(stack_env: dict[str, str], tmp_path: Path) -> Iterator[tuple[Any, Workers]]:
    parts = urllib.parse.urlsplit(stack_env["LIPSYNC_REDIS_URL"])
    own_db = urllib.parse.urlunsplit(parts._replace(path="/9"))
    env = {
        **stack_env,
        "LIPSYNC_REDIS_URL": own_db,
        "LIPSYNC_BROKER_URL": own_db,
        "LIPSYNC_KEY_PREFIX": "capped",
        "LIPSYNC_MAX_IN_FLIGHT": str(CAP),
        "LIPSYNC_ADMISSION_RECHECK_S": str(RECHECK_S),
    }
    from producers.api import LipsyncClient

    workers = Workers(env, tmp_path)
    specs = [
        WorkerSpec("transfer", "prefork", 2, "transfer"),
        WorkerSpec("api", "threads", 8, "api-one"),
        WorkerSpec("api", "threads", 8, "api-two"),
    ]
    for spec in specs:
        workers.start(spec)
    client = LipsyncClient(settings_from(env))
    try:
        deadline = time.monotonic() + 60
        while workers.logs().count(" ready.") < len(specs):
            assert time.monotonic() < deadline, "the capped workers did not start"
            time.sleep(0.2)
        yield client, workers
    finally:
        client.redis.flushdb()
        client.close()
        workers.stop_all()


def test_in_flight_cap_holds_across_two_worker_processes_and_every_slot_comes_back(
    capped: tuple[Any, Workers], media: dict[str, str], emulator: Any
) -> None:
    client, workers = capped
    emulator.configure(latency="1.5", concurrency=64)
    before = emulator.counters()
    try:
        with AtFal(emulator) as at_fal:
            started = time.monotonic()
            jobs = [client.submit(media["video_3s"], media["audio_3s"]) for _ in range(12)]
            # Four rounds of three at 1.5 s each: well within the bound below, unless the later
            # jobs waited out their recheck (600 s) because no freed slot was handed on.
            done = client.wait([job.id for job in jobs], timeout_s=150)
            took = time.monotonic() - started
        assert {job.status for job in done} == {JobStatus.completed}, [job.error for job in done]
        assert took < 150, f"the batch took {took:.0f} s: freed slots were not handed to the waiting jobs"
        # Waiting jobs did not spin: a job's first submit runs in place after its stage (no task);
        # a job that found the cap full gets one task when its turn comes (a few more at most).
        submit_tasks = len(re.findall(r"Task lipsync\.submit\[[^\]]*\] received", workers.logs()))
        assert 12 - CAP <= submit_tasks <= 12 + CAP, f"{submit_tasks} submit tasks for 12 jobs"
        assert at_fal.highest <= CAP, f"{at_fal.highest} requests at fal at once, over the cap of {CAP}"
        assert at_fal.highest >= 2, "the two api workers never had two requests at fal: the cap was not shared"
        # Every slot came back: a second round can again fill the whole cap at once
        # (fal takes long enough that all three are there together).
        emulator.configure(latency="6")
        with AtFal(emulator) as again:
            jobs = [client.submit(media["video_3s"], media["audio_3s"]) for _ in range(CAP)]
            done = client.wait([job.id for job in jobs], timeout_s=180)
        assert {job.status for job in done} == {JobStatus.completed}
        assert again.highest == CAP, f"only {again.highest} of {CAP} slots were free after the first round"
    finally:
        emulator.configure(latency="0.3", concurrency=8)
    assert emulator.created_since(before) == 12 + CAP


# The fair queue's choices, read off the admission script against a real Redis ----------------

FAL = FalRequest(request_id="req-1", status_url="http://x/s", response_url="http://x/r", cancel_url="http://x/c")


class Queue:
    """Jobs in `submitting` asking admission for a slot, as the submit step does."""

    def __init__(self, redis_server: Any, cap: int, credit_slots: float | None = None) -> None:
        client = redis.Redis.from_url(redis_server.url)
        prefix = f"q{uuid.uuid4().hex[:8]}"
        self.store = JobStore(client, prefix)
        self.admission = AdmissionControl(
            client, prefix=prefix, max_in_flight=cap, submits_per_second=1000, recheck_s=RECHECK_S,
            credit_slots=credit_slots,
        )  # fmt: skip
        self.tenant: dict[str, str] = {}

    def ask(self, tenant: str, count: int = 1) -> list[str]:
        ids = []
        for _ in range(count):
            now = time.time()
            job = Job(
                id=self.store.new_id(), status=JobStatus.queued, request=LipsyncInput(video_url="s3://b/v.mp4",
                audio_url="s3://b/a.wav"), request_digest="d", created_at=now, updated_at=now,
                deadline_at=now + 600, tenant=tenant,
            )  # fmt: skip
            self.store.create(job, dispatch_lease_s=30)
            self.store.advance(job.id, JobStatus.submitting, from_=[JobStatus.queued], due_at=now + RECHECK_S)
            self.tenant[job.id] = tenant
            ids.append(job.id)
        return ids

    def admit(self, job_id: str) -> Any:
        return self.admission.admit(job_id, claim="submit_claimed_at", tenant=self.tenant[job_id])

    def finish(self, job_id: str) -> None:
        """The job reaches fal and leaves it: its slot comes back."""
        self.store.advance(
            job_id, JobStatus.submitted, from_=[JobStatus.submitting], fields={"fal": FAL.model_dump()},
            due_at=time.time() + 30,
        )  # fmt: skip
        self.store.advance(job_id, JobStatus.storing, from_=AT_FAL_STATUSES, due_at=time.time() + 30)

    def turns(self, running: list[str], count: int) -> list[str]:
        """Free one slot at a time and dispatch it: the tenants in the order their turns came."""
        order = []
        for _ in range(count):
            self.finish(running.pop(0))
            [woken] = self.admission.dispatch()
            assert self.admit(woken).admitted  # the woken job holds its reserved slot
            running.append(woken)
            order.append(self.tenant[woken])
        return order


def test_a_job_refused_for_a_full_cap_waits_long_and_a_freed_slot_is_dispatched_to_the_next(
    redis_server: Any,
) -> None:
    queue = Queue(redis_server, cap=2)
    first, second, *waiting = queue.ask("a", 5)
    assert queue.admit(first).admitted and queue.admit(second).admitted
    refused = [queue.admit(job_id) for job_id in waiting]
    # No spinning: a job refused for a full cap waits the safety-net recheck, not a second.
    assert [(r.admitted, r.retry_after, r.wake) for r in refused] == [(False, RECHECK_S, None)] * 3
    assert queue.admission.dispatch() == []  # no slot free
    queue.finish(first)
    # The freed slot goes to the head of the fair queue (first come, first served), reserved for it,
    # and its next look in the schedule comes within seconds: a lost wake costs seconds, not the recheck.
    now = time.time()
    assert queue.admission.dispatch() == [waiting[0]]
    due = {job_id: queue.store.redis.zscore(queue.store.keys.schedule, job_id) for job_id in waiting}
    assert due[waiting[0]] is not None and due[waiting[0]] <= now + WAKE_BACKUP_S + 1
    assert all(score is not None and score > now + RECHECK_S - 5 for score in (due[waiting[1]], due[waiting[2]]))
    assert queue.admission.dispatch() == []  # the cap is full again: one slot, one job
    assert not queue.admit(waiting[1]).admitted  # not the next one's: it was reserved
    assert queue.admit(waiting[0]).admitted  # the woken job finds its slot
    # A stale duplicate of its submit task takes nothing more (its claim is there).
    again = queue.admit(waiting[0])
    assert again.claimed_before and queue.admission.in_flight() == 2
    queue.finish(second)
    queue.finish(waiting[0])
    assert queue.admission.dispatch() == waiting[1:]  # every free slot at once, in order
    assert queue.admission.dispatch() == []


def test_a_small_tenant_behind_a_big_batch_takes_the_freed_slots_until_its_credit_is_spent(
    redis_server: Any,
) -> None:
    queue = Queue(redis_server, cap=2, credit_slots=4)
    batch = queue.ask("big", 12)
    running = [job_id for job_id in batch if queue.admit(job_id).admitted]
    assert len(running) == 2
    assert queue.turns(running, 3) == ["big"] * 3  # the batch alone: its virtual time is 5 now
    small = queue.ask("small", 6)
    for job_id in small:
        assert not queue.admit(job_id).admitted
    # Credit 4: the small tenant comes back at 5 - 4 = 1 and takes the next 4 slots; then at 5, a
    # tie with the batch goes to the tenant with fewer jobs waiting; then the two alternate.
    assert queue.turns(running, 8) == ["small"] * 5 + ["big", "small", "big"]


def test_without_credit_a_tie_between_tenants_goes_to_the_one_with_fewer_jobs_waiting(redis_server: Any) -> None:
    queue = Queue(redis_server, cap=1, credit_slots=0)
    batch = queue.ask("a-big", 8)
    running = [job_id for job_id in batch if queue.admit(job_id).admitted]
    queue.turns(running, 1)
    small = queue.ask("z-small", 3)
    for job_id in small:
        queue.admit(job_id)
    # Both at the same virtual time: the small tenant first (its name sorts last), then alternating.
    assert queue.turns(running, 5) == ["z-small", "a-big", "z-small", "a-big", "z-small"]
