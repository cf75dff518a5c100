"""Losing the Redis host: the master is killed with kill -9 while a batch runs, Sentinel promotes
the replica, and every job still ends once, paid once (issue 14).

Real processes on free ports: a master, a replica and three Sentinels (tests/fixtures/sentinel),
real `celery worker` processes on the Sentinel URL (broker and job store), the emulator taking
2-4 s a request. The submit claim and the fal request id are acknowledged by the replica
(`LIPSYNC_REDIS_MIN_REPLICAS_ACK=1`, policy refuse). The killed host comes back empty and
Sentinel makes it the new master's replica, as a replaced host would.

Duplicates are counted at the emulator by what it created (its account's `created` counter),
not by our job-id header.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from producers.devstack import DEFAULT_WORKERS
from tests.chaos.conftest import FAKE_FAL_KEY, ChaosStack
from tests.chaos.harness import Progress, submit_batch, verify
from tests.conftest import Workers
from tests.fixtures.sentinel import SentinelTopology, start_sentinel_topology, wait_until

pytestmark = pytest.mark.slow

JOBS = int(os.environ.get("LIPSYNC_FAILOVER_JOBS", "100"))
BOUND_S = 240.0


@pytest.fixture
def failover_stack(
    chaos_stack: ChaosStack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[SentinelTopology, Workers, dict[str, str]]]:
    """The chaos stack's S3 and emulator, with a Sentinel topology of its own for Redis."""
    chaos_stack.kill_workers()  # the chaos stack's own workers use its single Redis
    chaos_stack.emulator.reset()
    chaos_stack.emulator.configure(latency="2-4", retention=3600, retention_large=360, concurrency=64)
    topology = start_sentinel_topology(tmp_path_factory.mktemp("failover-redis"))
    env = {
        **chaos_stack.env,
        "LIPSYNC_REDIS_URL": topology.url,
        "LIPSYNC_BROKER_URL": topology.url,
        "LIPSYNC_KEY_PREFIX": "failover",
        "LIPSYNC_REDIS_MIN_REPLICAS_ACK": "1",
        "LIPSYNC_REDIS_ACK_TIMEOUT_MS": "500",
        "LIPSYNC_REDIS_ACK_POLICY": "refuse",
    }
    logdir = tmp_path_factory.mktemp("failover-logs")
    workers = Workers(env, logdir)
    try:
        for spec in DEFAULT_WORKERS:
            workers.start(spec)
        wait_until(lambda: workers.logs().count(" ready.") >= len(DEFAULT_WORKERS), 90, "workers ready", 0.2)
        yield topology, workers, env
    finally:
        workers.stop_all()
        topology.stop()


def _created(stack: ChaosStack) -> int:
    return int(stack.emulator.account(FAKE_FAL_KEY).get("created", 0))


def _run(
    chaos_stack: ChaosStack,
    failover_stack: tuple[SentinelTopology, Workers, dict[str, str]],
    small_media: Any,
    tmp_path: Path,
    figures: list[dict[str, Any]],
    *,
    scenario: str,
    kill_after_created: int,
) -> None:
    from producers.api import LipsyncClient
    from tests.fixtures.isolated import settings_from

    topology, _, env = failover_stack
    client = LipsyncClient(settings_from(env))
    try:
        submitted = submit_batch(client, small_media, JOBS, scenario.split()[0])
        with Progress(env["LIPSYNC_REDIS_URL"], "failover", submitted.job_ids) as progress:
            # Kill the moment the emulator has created the request that crosses the threshold:
            # the request id's save (and the next claims) are in flight.
            wait_until(lambda: _created(chaos_stack) >= kill_after_created, 120, "submits under way", 0.01)
            old = topology.kill_master()
            killed_at = time.time()
            topology.wait_for_failover(old.port)
            promoted_s = round(time.time() - killed_at, 2)
            # Back empty, as the new master's replica: the way a restarted host rejoins (it asks
            # Sentinel for the master first). Left to Sentinel's own conversion, the rejoin waits on
            # Sentinel, which on a starved CPU enters TILT mode and acts only 30 s later.
            old.start(replica_of=topology.master.port)
            wait_until(topology.replica_in_sync, 60, "the old master syncing as a replica", 0.1)
            replica_back_s = round(time.time() - killed_at, 2)
            all_done = progress.wait_all(BOUND_S)
            recovery_s = progress.recovery_after(killed_at)
        jobs = client.store.get_many(submitted.job_ids)
        created = _created(chaos_stack)
        request_ids = {job.fal.request_id for job in jobs if job.fal is not None}
        verdict = verify(
            client, chaos_stack.emulator, submitted, scenario=scenario, explained={}, tmp_path=tmp_path,
            extra={
                "kills": 1, "created_at_kill": kill_after_created, "promoted_s": promoted_s,
                "replica_back_s": replica_back_s, "recovery_s": recovery_s, "fal_created": created,
                "created_duplicates": created - len(submitted.job_ids),
            },
        )  # fmt: skip
        figures.append(verdict.figures)
        print(verdict.figures)
        assert all_done, f"not every job ended within {BOUND_S} s: {verdict.problems[:5]}"
        assert not verdict.problems, "\n".join(verdict.problems[:20])
        assert verdict.figures["completed"] == JOBS
        # Every request fal created belongs to exactly one job: none paid twice.
        assert created == JOBS and len(request_ids) == JOBS
    finally:
        client.close()


def test_master_killed_mid_batch_every_job_completes_once(
    chaos_stack: ChaosStack, failover_stack: Any, small_media: Any, tmp_path: Path, chaos_figures: list[dict[str, Any]]
) -> None:
    _run(
        chaos_stack, failover_stack, small_media, tmp_path, chaos_figures,
        scenario="sentinel failover mid-batch", kill_after_created=JOBS // 2,
    )  # fmt: skip


def test_master_killed_right_after_submits_pays_once(
    chaos_stack: ChaosStack, failover_stack: Any, small_media: Any, tmp_path: Path, chaos_figures: list[dict[str, Any]]
) -> None:
    _run(
        chaos_stack, failover_stack, small_media, tmp_path, chaos_figures,
        scenario="sentinel failover right after submits", kill_after_created=max(1, JOBS // 10),
    )  # fmt: skip
