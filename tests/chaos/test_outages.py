"""Crash and outage scenarios: workers killed, Redis restarted, S3 away, fal misbehaving.

Each runs a batch of at least 100 jobs (every sync mode, both length orders, the emulator
taking 2-4 s a request) while something breaks, then checks the three promises: no job lost
(every job terminal within the stated bound, none left in the schedule), none paid twice
(every request fal created belongs to a job), and every completed output really in S3 with
the right length. Outcomes are asserted in numbers: each failure kind at most as often as
the faults injected can cause it, so the rest of the batch must complete. The figures of
each run are printed at the end of the session.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from producers.devstack import DEFAULT_WORKERS, WorkerSpec
from tests.chaos.conftest import ChaosStack
from tests.chaos.harness import Progress, pool_children, submit_batch, verify
from tests.fixtures.isolated import kill_group

pytestmark = pytest.mark.slow

JOBS = 100
# Every job must be terminal this long after the last disruption ended.
BOUND_S = 180.0
# The api worker's threads: the most submits one kill of it can catch mid-POST. A submit whose
# answer was lost that way is failed in words (submit_outcome_unknown) rather than sent twice.
API_SLOTS = next(spec.concurrency for spec in DEFAULT_WORKERS if spec.name == "api")
# docs/reliability.md: a killed worker's jobs come due when their lease lapses (the transfer
# lease, 20 s here, is the longer); after Redis or S3 is back, within seconds (the next
# backoff step, at most LIPSYNC_RETRY_MAX_S = 5 s). Plus a margin for this shared machine.
RECOVERY_AFTER_KILL_S = 20 + 15
RECOVERY_AFTER_OUTAGE_S = 5 + 15


@pytest.fixture
def stack(chaos_stack: ChaosStack) -> Iterator[ChaosStack]:
    """Each scenario starts with the production shape: one worker per queue, a calm emulator."""
    chaos_stack.emulator.reset()
    chaos_stack.emulator.configure(latency="2-4", retention=3600, retention_large=360, concurrency=64)
    if not chaos_stack.s3_proxy.up:
        chaos_stack.s3_proxy.start()
    chaos_stack.start_workers()
    yield chaos_stack
    chaos_stack.emulator.clear_faults()


@pytest.fixture
def client(chaos_stack: ChaosStack) -> Iterator[Any]:
    from producers.api import LipsyncClient

    lipsync = LipsyncClient(chaos_stack.settings())
    yield lipsync
    lipsync.close()


def finish(
    stack: ChaosStack,
    client: Any,
    progress: Progress,
    submitted: Any,
    scenario: str,
    tmp_path: Path,
    figures: list[dict[str, Any]],
    *,
    explained: dict[str, int],
    restored: list[float],
    extra: dict[str, Any],
    recovery_bound_s: float | None = None,
) -> Any:
    all_done = progress.wait_all(BOUND_S)
    recoveries = [r for r in (progress.recovery_after(t) for t in restored) if r is not None]
    verdict = verify(
        client,
        stack.emulator,
        submitted,
        scenario=scenario,
        explained=explained,
        tmp_path=tmp_path,
        extra={
            **extra,
            "bound_s": BOUND_S,
            "recovery_s": max(recoveries) if recoveries else None,
            "drain_after_last_disruption_s": round(max(progress.terminal_at.values()) - restored[-1], 1)
            if restored and progress.terminal_at
            else None,
        },
    )
    figures.append(verdict.figures)
    print(verdict.figures)
    assert all_done, f"not every job ended within {BOUND_S} s: {verdict.problems[:5]}"
    assert not verdict.problems, "\n".join(verdict.problems[:20])
    assert verdict.figures["duplicates"] == 0 and verdict.figures["lost"] == 0
    failed = verdict.figures["failed"]
    assert verdict.figures["completed"] == len(submitted.job_ids) - failed
    assert failed <= sum(explained.values()), (failed, explained)
    if recovery_bound_s is not None:
        recovery = verdict.figures["recovery_s"]
        assert recovery is not None and recovery <= recovery_bound_s, (recovery, recovery_bound_s)
    return verdict


def test_workers_killed_at_random_moments_lose_nothing_and_pay_once(
    stack: ChaosStack, client: Any, small_media: Any, tmp_path: Path, chaos_figures: list[dict[str, Any]]
) -> None:
    """kill -9 a transfer pool child, then a worker's main process, several times, restarting it."""
    rng = random.Random(4)
    submitted = submit_batch(client, small_media, JOBS, "kill-workers")
    kills: list[str] = []
    restored: list[float] = []
    with Progress(client.settings.redis_url, client.settings.key_prefix, submitted.job_ids) as progress:
        for round_ in range(4):
            time.sleep(rng.uniform(1.5, 4.0))
            transfer = stack.workers.processes["transfer"]
            children = pool_children(transfer.pid)
            if children:
                os.kill(rng.choice(children), signal.SIGKILL)  # the pool replaces it at once
                kills.append("transfer pool child")
            time.sleep(rng.uniform(1.0, 3.0))
            name = "api" if round_ % 2 == 0 else "transfer"
            main = stack.workers.processes[name]
            os.kill(main.pid, signal.SIGKILL)
            kills.append(f"{name} main process")
            main.wait(10)
            kill_group(main)  # orphaned pool children die with their parent, as under systemd/k8s
            stack.start_worker(name)
            stack.wait_workers_ready()
            restored.append(time.time())
        api_kills = sum(kill == "api main process" for kill in kills)
        finish(
            stack, client, progress, submitted, "kill -9 workers (x8)", tmp_path, chaos_figures,
            explained={"submit_outcome_unknown": API_SLOTS * api_kills}, restored=restored,
            extra={"kills": len(kills)}, recovery_bound_s=RECOVERY_AFTER_KILL_S,
        )  # fmt: skip


def test_every_worker_killed_then_one_started_finishes_the_batch(
    stack: ChaosStack, client: Any, small_media: Any, tmp_path: Path, chaos_figures: list[dict[str, Any]]
) -> None:
    submitted = submit_batch(client, small_media, JOBS, "kill-all")
    with Progress(client.settings.redis_url, client.settings.key_prefix, submitted.job_ids) as progress:
        progress.wait_for(JOBS // 4, timeout=120)
        stack.kill_workers()
        killed_at = time.time()
        time.sleep(10)  # the outage itself: nothing runs for 10 s, the scenario's point
        one = WorkerSpec("transfer,api", "prefork", 4, "only")
        stack.start_spec(one)
        stack.wait_workers_ready()
        restored = [time.time()]
        try:
            finish(
                stack, client, progress, submitted, "kill all, wait 10 s, start one", tmp_path, chaos_figures,
                explained={"submit_outcome_unknown": API_SLOTS}, restored=restored,
                recovery_bound_s=RECOVERY_AFTER_KILL_S,
                extra={
                    "disruptions": 1,
                    "done_before_kill": sum(1 for t in progress.terminal_at.values() if t <= killed_at),
                },
            )  # fmt: skip
        finally:
            stack.kill_workers()


def test_redis_restarted_mid_batch_loses_nothing(
    stack: ChaosStack, client: Any, small_media: Any, tmp_path: Path, chaos_figures: list[dict[str, Any]]
) -> None:
    """kill -9 redis-server (AOF, appendfsync always) with a third of the batch done; start it again.

    A producer waiting meanwhile (the Python API in a thread, `lipsync wait` in a process)
    rides the restart out and sees every job end.
    """
    submitted = submit_batch(client, small_media, JOBS, "redis-restart")
    waited: list[Any] = []
    waiter = threading.Thread(target=lambda: waited.extend(client.wait(submitted.job_ids, timeout_s=BOUND_S * 2)))
    env = {name: value for name, value in os.environ.items() if not name.startswith("LIPSYNC_")}
    cli = subprocess.Popen(
        [sys.executable, "-m", "producers.cli", "wait", *submitted.job_ids[-5:], "--json", "--timeout", "300"],
        env={**env, **stack.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with Progress(client.settings.redis_url, client.settings.key_prefix, submitted.job_ids) as progress:
        waiter.start()
        progress.wait_for(JOBS // 3, timeout=120)
        # `lipsync wait` must be waiting already (not still starting up) when Redis goes:
        # a CLI that cannot reach Redis at its start says so and exits 2, by design.
        redis_port = urllib.parse.urlsplit(stack.env["LIPSYNC_REDIS_URL"]).port
        deadline = time.monotonic() + 60
        while not any(
            c.raddr and c.raddr.port == redis_port and c.status == psutil.CONN_ESTABLISHED
            for c in psutil.Process(cli.pid).net_connections(kind="tcp")
        ):
            assert cli.poll() is None and time.monotonic() < deadline, "lipsync wait never reached Redis"
            time.sleep(0.05)
        stack.kill_redis()
        time.sleep(3)
        stack.start_redis()
        restored = [time.time()]
        finish(
            stack, client, progress, submitted, "redis-server kill -9 + restart", tmp_path, chaos_figures,
            # The claim and the request id are saved through the blip: nothing to explain.
            explained={}, restored=restored, extra={"disruptions": 1, "redis_down_s": 3},
            recovery_bound_s=RECOVERY_AFTER_OUTAGE_S,
        )  # fmt: skip
    waiter.join(60)
    assert [job.id for job in waited] == submitted.job_ids and all(job.terminal for job in waited)
    out, err = cli.communicate(timeout=120)
    assert cli.returncode == 0, err[-2000:]
    assert [json.loads(line)["status"] for line in out.splitlines() if line.strip()] == ["completed"] * 5


def test_s3_unreachable_for_ten_seconds_loses_nothing(
    stack: ChaosStack, client: Any, small_media: Any, tmp_path: Path, chaos_figures: list[dict[str, Any]]
) -> None:
    """Every connection to S3 refused (and open ones reset) for 10 s, for workers and fal alike.

    fal cannot download the inputs of the requests it runs meanwhile and fails them with
    `file_download_error`; the model never ran on those, and the inputs are fine: each such job
    is submitted again with fresh URLs once S3 is back, and completes. Nothing is explained by the
    outage any more, and no job has the model run twice."""
    submitted = submit_batch(client, small_media, JOBS, "s3-outage")
    with Progress(client.settings.redis_url, client.settings.key_prefix, submitted.job_ids) as progress:
        progress.wait_for(JOBS // 5, timeout=120)
        stack.s3_proxy.stop()
        time.sleep(10)  # the outage itself
        stack.s3_proxy.start()
        restored = [time.time()]
        verdict = finish(
            stack, client, progress, submitted, "S3 unreachable 10 s", tmp_path, chaos_figures,
            explained={}, restored=restored, extra={"disruptions": 1, "s3_down_s": 10},
            recovery_bound_s=RECOVERY_AFTER_OUTAGE_S,
        )  # fmt: skip
    assert verdict.figures["completed"] >= 95, verdict.figures
    # The extra requests at fal are the resubmissions only (`verify` checks each one failed with
    # file_download_error and was counted by its job), so the outage must have caused some here:
    # else this run proves nothing about them.
    resubmitted = verdict.figures["resubmitted_after_failed_download"]
    assert verdict.figures["fal_requests"] == JOBS + resubmitted, verdict.figures
    assert resubmitted > 0, "fal never failed a download during the outage: the scenario proves nothing"
    assert sum(job.attempts.get("input_download", 0) for job in verdict.jobs) == resubmitted


def inject_in_turn(emulator: Any, faults: list[tuple[str, int]]) -> None:
    for name, count in faults:
        emulator.set_faults(**{name: f"once:{count}"})
        deadline = time.monotonic() + 60
        while emulator.counters()["faults_injected"].get(name, 0) < count and time.monotonic() < deadline:
            time.sleep(0.02)


def test_fal_faults_are_retried_or_explained_and_never_paid_twice(
    stack: ChaosStack, client: Any, small_media: Any, tmp_path: Path, chaos_figures: list[dict[str, Any]]
) -> None:
    """20% 5xx (ingress and runner), 429s, dropped submit answers, hangs, model errors, 20 s retention,
    and a few results that expire before they are fetched."""
    emulator = stack.emulator
    emulator.configure(retention=20, retention_large=20)  # retention follows the JSON result's size
    emulator.set_faults(ingress_5xx=0.1, runner_5xx=0.1, rate_limit=0.1, hang=0.02)
    # Counted rather than drawn, and one kind after the other, so that each lands on requests
    # of its own in every run (a dropped answer would hide a model error on the same request).
    sequence = threading.Thread(
        target=inject_in_turn, args=(emulator, [("drop_submit", 3), ("model_error", 5), ("expire_result", 2)])
    )
    sequence.start()
    submitted = submit_batch(client, small_media, JOBS, "fal-faults")
    sequence.join(120)
    with Progress(client.settings.redis_url, client.settings.key_prefix, submitted.job_ids) as progress:
        progress.wait_all(BOUND_S)  # then count the faults injected: rates keep firing until the end
        injected = emulator.counters()["faults_injected"]
        # A result is gone either because expire_result said so, or because the 20 s retention ran
        # out while hangs and 5xx held its polls back: both are this scenario's faults. Each gone
        # job must be one of the two (checked below), and only those may fail as gone.
        at_fal = {request["id"]: request for request in emulator.requests()}
        gone = [
            job for job in client.store.get_many(submitted.job_ids)
            if job.error is not None and job.error.code == "fal_request_gone"
        ]  # fmt: skip
        for job in gone:
            assert job.fal is not None
            request = at_fal[job.fal.request_id]
            assert "expire_result" in request["inject"] or request["swept"], (job.id, request)
        retention_ran_out = sum(
            1 for job in gone if job.fal and "expire_result" not in at_fal[job.fal.request_id]["inject"]
        )
        verdict = finish(
            stack, client, progress, submitted, "fal faults", tmp_path, chaos_figures,
            explained={
                # Each failure kind tied to the fault that causes it; 5xx and 429 cause none.
                "submit_outcome_unknown": injected.get("drop_submit", 0) + injected.get("hang", 0),
                "fal_error": injected.get("model_error", 0),
                "fal_request_gone": injected.get("expire_result", 0) + retention_ran_out,
            },
            restored=[], extra={"retention_ran_out": retention_ran_out},
        )  # fmt: skip
    # A model error fails its job, one for one: not fewer (hidden), not more (5xx made fatal).
    assert verdict.figures["failures_by_code"].get("fal_error", 0) == injected.get("model_error", 0) == 5
    assert injected.get("drop_submit", 0) == 3 and injected.get("expire_result", 0) == 2
