"""The job store and admission control on a real redis-server: atomic transitions, leases,
the durable schedule, idempotency, and the global in-flight cap."""

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
from lipsync.jobstore import JobStore
from lipsync.models import Job, JobStatus, LipsyncInput


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


def test_transition_is_guarded_timestamped_and_evented(store: JobStore) -> None:
    job, created = store.create(new_job(store), dispatch_lease_s=30)
    assert created
    applied, before = store.transition(job.id, JobStatus.staging, from_=[JobStatus.queued], event="go")
    assert applied and before is JobStatus.queued
    applied, before = store.transition(job.id, JobStatus.submitting, from_=[JobStatus.queued])
    assert not applied and before is JobStatus.staging
    loaded = store.get(job.id)
    assert loaded.status is JobStatus.staging and set(loaded.timestamps) == {"queued", "staging"}
    assert [e["status"] for e in store.events(job.id)] == ["queued", "staging"]
    assert store.counts()["staging"] == 1 and store.counts()["queued"] == 0


def test_terminal_transition_leaves_the_schedule(store: JobStore) -> None:
    job, _ = store.create(new_job(store), dispatch_lease_s=30)
    assert store.scheduled_at(job.id) is not None
    store.transition(job.id, JobStatus.failed)
    assert store.scheduled_at(job.id) is None


def test_only_one_of_many_concurrent_claims_wins(store: JobStore) -> None:
    job, _ = store.create(new_job(store), dispatch_lease_s=30)

    def claim(_: int) -> bool:
        return store.transition(
            job.id, None, require_absent=["submit_claimed_at"], set_fields={"_submit_claimed_at": "1"}
        )[0]

    with ThreadPoolExecutor(16) as pool:
        assert sum(pool.map(claim, range(64))) == 1


def test_lease_excludes_a_second_runner_until_it_lapses(store: JobStore) -> None:
    job, _ = store.create(new_job(store), dispatch_lease_s=30)
    assert store.acquire(job.id, "a", 0.5)
    assert not store.acquire(job.id, "b", 10)
    time.sleep(0.6)
    assert store.acquire(job.id, "b", 10)
    # Holding the lease pushes the job's schedule entry past the lease: no one else is sent.
    assert store.scheduled_at(job.id) >= time.time() + 9  # type: ignore[operator]


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
    admission.release(admitted)
    assert admission.admit("job-new").admitted


def test_admission_paces_submits_to_the_configured_rate(redis_server: Any) -> None:
    client = redis.Redis.from_url(redis_server.url)
    admission = AdmissionControl(client, prefix=f"r{uuid.uuid4().hex[:8]}", max_in_flight=10_000, submits_per_second=10)
    outcomes = [admission.admit(f"job-{i}") for i in range(30)]
    admitted = [o for o in outcomes if o.admitted]
    assert len(admitted) == 10  # one second's burst
    assert all(0 < o.retry_after <= 2.1 for o in outcomes if not o.admitted)
