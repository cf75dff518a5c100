"""After a Redis failover, a job not ended that is in no schedule is found again (issue 14)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from lipsync.jobstore import JobStore
from lipsync.models import JobError, JobStatus
from tests.integration.test_jobstore import FAL, new_job


@pytest.fixture
def store(redis_server: Any) -> Iterator[JobStore]:
    client = redis.Redis.from_url(redis_server.url)
    yield JobStore(client, prefix=f"t{uuid.uuid4().hex[:8]}")
    client.close()


def test_jobs_whose_schedule_entry_a_failover_forgot_are_put_back(store: JobStore) -> None:
    queued, at_fal, ended, fine = (new_job(store) for _ in range(4))
    for job in (queued, at_fal, ended, fine):
        store.create(job, dispatch_lease_s=5)
    store.advance(at_fal.id, JobStatus.submitted, from_=[JobStatus.queued], fields={"fal": FAL.model_dump()}, due_at=1)
    store.fail(ended.id, JobError(code="x", message="gone"))
    # What a promoted replica that missed the entries' writes looks like.
    store.redis.zrem(store.schedule_key, queued.id, ended.id)
    store.redis.zrem(store.waiting_key, at_fal.id)
    before = store.scheduled_at(fine.id)

    assert sorted(store.reschedule_lost()) == sorted([queued.id, at_fal.id])
    assert store.scheduled_at(queued.id) is not None and store.scheduled_at(at_fal.id) is not None
    assert store.scheduled_at(ended.id) is None  # ended: nothing to look at
    assert store.scheduled_at(fine.id) == before  # an entry it has is left as it is
    assert store.reschedule_lost() == []
