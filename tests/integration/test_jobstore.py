"""The job store and admission control on a real redis-server: atomic named writes, leases
(a runner whose lease was taken writes nothing), the durable schedules, idempotency, and the
global in-flight cap whose slot is given back when the job leaves fal."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis

from lipsync.admission import AdmissionControl
from lipsync.errors import IdempotencyConflict
from lipsync.jobstore import JobStore, LeaseLost
from lipsync.models import AT_FAL_STATUSES, FalRequest, Job, JobError, JobStatus, LipsyncInput

NOT_ENDED = [s for s in JobStatus if not s.terminal]
FAL = FalRequest(request_id="req-1", status_url="http://x/s", response_url="http://x/r", cancel_url="http://x/c")


@pytest.fixture
def store(redis_server: Any) -> Iterator[JobStore]:
    client = redis.Redis.from_url(redis_server.url)
    yield JobStore(client, prefix=f"t{uuid.uuid4().hex[:8]}")
    client.close()


def new_job(store: JobStore, key: str | None = None, video: str = "s3://b/v.mp4") -> Job:
    now = time.time()
    request = LipsyncInput(video_url=video, audio_url="s3://b/a.wav")
    return Job(
        id=store.new_id(), status=JobStatus.queued, request=request, idempotency_key=key,
        request_digest=video, created_at=now, updated_at=now, deadline_at=now + 60,
    )  # fmt: skip


def test_advance_is_guarded_timestamped_and_evented(store: JobStore) -> None:
    job, created = store.create(new_job(store), dispatch_lease_s=30)
    assert created
    moved = store.advance(job.id, JobStatus.staging, from_=[JobStatus.queued], event="go", due_at=time.time() + 30)
    assert moved.applied and moved.before is JobStatus.queued
    moved = store.advance(job.id, JobStatus.submitting, from_=[JobStatus.queued])
    assert not moved.applied and moved.before is JobStatus.staging
    loaded = store.get(job.id)
    assert loaded.status is JobStatus.staging and set(loaded.timestamps) == {"queued", "staging"}
    assert [e["status"] for e in store.events(job.id)] == ["queued", "staging"]
    assert store.counts()["staging"] == 1 and store.counts()["queued"] == 0


def test_ending_a_job_leaves_both_schedules(store: JobStore) -> None:
    job, _ = store.create(new_job(store), dispatch_lease_s=30)
    assert store.scheduled_at(job.id) is not None
    store.advance(job.id, JobStatus.in_progress, from_=NOT_ENDED, fields={"fal": FAL.model_dump()}, due_at=time.time())
    assert store.redis.zscore(store.waiting_key, job.id) is not None
    assert store.redis.zscore(store.schedule_key, job.id) is None  # at fal: the poller's, not the dispatcher's
    store.fail(job.id, JobError(code="x", message="no"))
    assert store.scheduled_at(job.id) is None


def test_only_one_of_many_concurrent_submit_claims_wins(store: JobStore) -> None:
    job, _ = store.create(new_job(store), dispatch_lease_s=30)
    admission = AdmissionControl(store.redis, prefix=store.prefix, max_in_flight=100, submits_per_second=1000)

    def claim(_: int) -> Any:
        return admission.admit(job.id, claim="submit_claimed_at", status="queued")

    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(claim, range(64)))
    assert sum(o.admitted for o in outcomes) == 1
    assert sum(o.claimed_before for o in outcomes) == 63  # the others know a POST may be out
    assert store.get(job.id).attempts["submit"] == 1 and admission.in_flight() == 1


def test_lease_excludes_a_second_runner_until_it_lapses(store: JobStore) -> None:
    job, _ = store.create(new_job(store), dispatch_lease_s=30)
    handles = [JobStatus.queued, JobStatus.staging]
    first = store.begin(job.id, "a", 0.5, handles, working=JobStatus.staging, counter="attempts:stage")
    assert first.job is not None and first.job.status is JobStatus.staging and first.job.attempts["stage"] == 1
    assert store.begin(job.id, "b", 10, handles).busy
    time.sleep(0.6)
    second = store.begin(job.id, "b", 10, handles, working=JobStatus.staging, counter="attempts:stage")
    assert second.job is not None and second.job.attempts["stage"] == 1  # already staging: not counted again
    # Holding the lease pushes the job's schedule entry past the lease: no one else is sent.
    assert store.scheduled_at(job.id) >= time.time() + 9  # type: ignore[operator]


def test_a_runner_whose_lease_was_taken_over_writes_nothing(store: JobStore) -> None:
    job, _ = store.create(new_job(store), dispatch_lease_s=30)
    handles = [JobStatus.queued, JobStatus.staging]
    assert store.begin(job.id, "slow", 0.3, handles, working=JobStatus.staging).job is not None
    time.sleep(0.4)
    assert store.begin(job.id, "new", 10, handles).job is not None
    assert not store.renew(job.id, "slow", 10)
    with pytest.raises(LeaseLost):
        store.advance(job.id, JobStatus.submitting, from_=handles, fields={"expected_duration": 1.0}, owner="slow")
    loaded = store.get(job.id)
    assert loaded.status is JobStatus.staging and loaded.expected_duration is None
    assert store.raw_field(job.id, "lease_owner") == "new"
    # The lease's holder writes, and gives the lease back in the same write.
    assert store.advance(job.id, JobStatus.submitting, from_=handles, owner="new").applied
    assert store.raw_field(job.id, "lease_owner") is None


def test_a_settled_fact_is_written_even_after_the_lease_lapsed(store: JobStore) -> None:
    job, _ = store.create(new_job(store), dispatch_lease_s=30)
    store.advance(job.id, JobStatus.submitting, from_=[JobStatus.queued], due_at=time.time() + 30)
    assert store.begin(job.id, "old", 10, [JobStatus.submitting]).job is not None
    store.redis.hset(store.job_key(job.id), "lease_owner", "other")
    fields = {"fal": FAL.model_dump()}
    assert store.advance(job.id, JobStatus.submitted, from_=[JobStatus.submitting], fields=fields, owner="?old").applied
    assert store.get(job.id).fal == FAL and store.raw_field(job.id, "lease_owner") == "other"


def test_claim_due_hands_each_entry_to_one_claimer_and_returns_it_after_the_lease(store: JobStore) -> None:
    ids = [store.create(new_job(store), dispatch_lease_s=0)[0].id for _ in range(50)]
    with ThreadPoolExecutor(8) as pool:
        claimed = [i for batch in pool.map(lambda _: store.claim_due(0.5, 10), range(20)) for i in batch]
    assert sorted(claimed) == sorted(ids)
    assert store.claim_due(0.5, 100) == []
    time.sleep(0.6)
    assert sorted(store.claim_due(0.5, 100)) == sorted(ids)


def test_idempotency_key_returns_the_first_job_and_refuses_another_request(store: JobStore) -> None:
    first, created = store.create(new_job(store, key="k1"), dispatch_lease_s=30)
    again, created_again = store.create(new_job(store, key="k1"), dispatch_lease_s=30)
    assert created and not created_again and again.id == first.id
    with pytest.raises(IdempotencyConflict, match="different request"):
        store.create(new_job(store, key="k1", video="s3://b/other.mp4"), dispatch_lease_s=30)


def test_admission_caps_jobs_in_flight_across_workers(redis_server: Any) -> None:
    client = redis.Redis.from_url(redis_server.url)
    admission = AdmissionControl(client, prefix=f"a{uuid.uuid4().hex[:8]}", max_in_flight=5, submits_per_second=1000)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: admission.admit(f"job-{i}").admitted, range(40)))
    assert sum(results) == 5 and admission.in_flight() == 5
    admitted = next(f"job-{i}" for i, ok in enumerate(results) if ok)
    assert admission.admit(admitted).admitted  # the same job again is not a second slot
    assert not admission.admit("job-other").admitted


def test_the_admission_slot_is_held_while_at_fal_and_freed_when_the_job_leaves(redis_server: Any) -> None:
    client = redis.Redis.from_url(redis_server.url)
    prefix = f"s{uuid.uuid4().hex[:8]}"
    store = JobStore(client, prefix)
    admission = AdmissionControl(client, prefix=prefix, max_in_flight=1, submits_per_second=1000)
    job, _ = store.create(new_job(store), dispatch_lease_s=30)
    store.advance(job.id, JobStatus.submitting, from_=[JobStatus.queued], due_at=time.time())
    assert admission.admit(job.id, claim="submit_claimed_at").admitted
    store.advance(
        job.id, JobStatus.submitted, from_=[JobStatus.submitting], fields={"fal": FAL.model_dump()}, due_at=time.time()
    )
    store.wait(job.id, time.time() + 1, from_=AT_FAL_STATUSES, to=JobStatus.in_progress, count=["attempts:poll"])
    assert admission.in_flight() == 1 and not admission.admit("job-other").admitted
    store.advance(job.id, JobStatus.storing, from_=AT_FAL_STATUSES, due_at=time.time() + 30)
    assert admission.in_flight() == 0 and admission.admit("job-other").admitted


def test_poller_claims_due_jobs_at_fal_with_their_request(store: JobStore) -> None:
    job, _ = store.create(new_job(store), dispatch_lease_s=30)
    store.advance(
        job.id, JobStatus.submitted, from_=[JobStatus.queued], fields={"fal": FAL.model_dump()}, due_at=time.time()
    )
    (claimed,) = store.claim_waiting(30, 10)
    assert claimed.id == job.id and claimed.status is JobStatus.submitted and claimed.polls == 0
    assert FalRequest.model_validate(claimed.fal) == FAL and claimed.deadline_at == job.deadline_at
    assert store.claim_waiting(30, 10) == []  # held by its claimer for the lease


def test_admission_paces_submits_to_the_configured_rate(redis_server: Any) -> None:
    client = redis.Redis.from_url(redis_server.url)
    admission = AdmissionControl(client, prefix=f"r{uuid.uuid4().hex[:8]}", max_in_flight=10_000, submits_per_second=10)
    started = time.monotonic()
    outcomes = [admission.admit(f"job-{i}") for i in range(30)]
    elapsed = time.monotonic() - started
    admitted = [o for o in outcomes if o.admitted]
    # One second's burst, plus what the rate refilled while the calls ran (a loaded machine).
    assert 10 <= len(admitted) <= 10 + int(10 * elapsed), (len(admitted), elapsed)
    assert all(0 < o.retry_after <= 2.1 for o in outcomes if not o.admitted)
