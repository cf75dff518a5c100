"""The crash scenarios again, with RabbitMQ as the broker: workers killed, the broker killed and
restarted. The job store stays in the chaos stack's Redis; the broker is a RabbitMQ node of
this module's own (its own ports and data folder), so killing it harms nothing else.

The same three promises are checked by the same harness: no job lost, none paid twice, every
completed output really in S3 with the right length.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from producers.devstack import DEFAULT_WORKERS
from tests.chaos.conftest import ChaosStack, kill_group
from tests.chaos.harness import Progress, pool_children, submit_batch, verify
from tests.conftest import Workers
from tests.fixtures.isolated import settings_from
from tests.fixtures.rabbitmq import PrivateRabbit

pytestmark = pytest.mark.slow

JOBS = 60
BOUND_S = 180.0
# A worker killed mid-POST fails its in-flight submits in words, never re-POSTed: at most one per
# api thread per kill of the api worker.
API_SLOTS = next(spec.concurrency for spec in DEFAULT_WORKERS if spec.name == "api")


class RabbitStack:
    def __init__(self, base: ChaosStack, rabbit: PrivateRabbit, logdir: Path) -> None:
        self.base = base
        self.rabbit = rabbit
        self.env = {**base.env, "LIPSYNC_BROKER_URL": rabbit.url, "LIPSYNC_KEY_PREFIX": "chaos-rmq"}
        self.workers = Workers(self.env, logdir)
        self.starts = 0

    def start_worker(self, name: str) -> None:
        self.starts += 1
        self.workers.start(next(spec for spec in DEFAULT_WORKERS if spec.name == name))

    def start_workers(self) -> None:
        for spec in DEFAULT_WORKERS:
            running = self.workers.processes.get(spec.name)
            if running is None or running.poll() is not None:
                self.start_worker(spec.name)
        self.wait_ready()

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while self.workers.logs().count(" ready.") < self.starts:
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers did not become ready: {self.workers.logs()[-2000:]}")
            time.sleep(0.2)


@pytest.fixture(scope="module")
def rabbit_stack(chaos_stack: ChaosStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitStack]:
    rabbit = PrivateRabbit()
    stack = RabbitStack(chaos_stack, rabbit, tmp_path_factory.mktemp("rabbit-chaos-logs"))
    try:
        rabbit.start()
        yield stack
    finally:
        for process in list(stack.workers.processes.values()):
            kill_group(process)
        rabbit.stop()


@pytest.fixture
def stack(rabbit_stack: RabbitStack) -> RabbitStack:
    rabbit_stack.base.emulator.reset()
    rabbit_stack.base.emulator.configure(latency="2-4", retention_large=360, concurrency=64)
    rabbit_stack.start_workers()
    return rabbit_stack


@pytest.fixture
def client(rabbit_stack: RabbitStack) -> Iterator[Any]:
    from producers.api import LipsyncClient

    lipsync = LipsyncClient(settings_from(rabbit_stack.env))
    yield lipsync
    lipsync.close()


def finish(
    stack: RabbitStack, client: Any, progress: Progress, submitted: Any, scenario: str, tmp_path: Path,
    figures: list[dict[str, Any]], *, explained: dict[str, int], restored: list[float], extra: dict[str, Any],
) -> None:  # fmt: skip
    all_done = progress.wait_all(BOUND_S)
    recoveries = [r for r in (progress.recovery_after(t) for t in restored) if r is not None]
    recovery = max(recoveries) if recoveries else None
    verdict = verify(
        client, stack.base.emulator, submitted, scenario=scenario, explained=explained, tmp_path=tmp_path,
        extra={**extra, "broker": "rabbitmq", "bound_s": BOUND_S, "recovery_s": recovery},
    )  # fmt: skip
    figures.append(verdict.figures)
    print(verdict.figures)
    assert all_done, f"not every job ended within {BOUND_S} s: {verdict.problems[:5]}"
    assert not verdict.problems, "\n".join(verdict.problems[:20])
    assert verdict.figures["duplicates"] == 0 and verdict.figures["lost"] == 0
    assert "Unrecoverable error" not in stack.workers.logs()


def test_workers_killed_on_rabbitmq_lose_nothing_and_pay_once(
    stack: RabbitStack, client: Any, small_media: Any, tmp_path: Path, chaos_figures: list[dict[str, Any]]
) -> None:
    """kill -9 a transfer pool child, then a worker's main process, four times, restarting it."""
    rng = random.Random(7)
    submitted = submit_batch(client, small_media, JOBS, "rmq-kill-workers")
    kills: list[str] = []
    restored: list[float] = []
    with Progress(client.settings.redis_url, client.settings.key_prefix, submitted.job_ids) as progress:
        for round_ in range(4):
            time.sleep(rng.uniform(1.5, 4.0))
            children = pool_children(stack.workers.processes["transfer"].pid)
            if children:
                os.kill(rng.choice(children), signal.SIGKILL)
                kills.append("transfer pool child")
            time.sleep(rng.uniform(1.0, 3.0))
            name = "api" if round_ % 2 == 0 else "transfer"
            main = stack.workers.processes[name]
            os.kill(main.pid, signal.SIGKILL)
            kills.append(f"{name} main process")
            main.wait(10)
            kill_group(main)
            stack.start_worker(name)
            stack.wait_ready()
            restored.append(time.time())
        finish(
            stack, client, progress, submitted, "rabbitmq: kill -9 workers (x8)", tmp_path, chaos_figures,
            explained={"submit_outcome_unknown": API_SLOTS * sum(k == "api main process" for k in kills)},
            restored=restored, extra={"kills": len(kills)},
        )  # fmt: skip


def test_rabbitmq_killed_and_restarted_mid_batch_loses_nothing(
    stack: RabbitStack, client: Any, small_media: Any, tmp_path: Path, chaos_figures: list[dict[str, Any]]
) -> None:
    """kill -9 the broker with a third of the batch done, start it again 3 s later on the same data.

    Quorum queues keep what they confirmed; unacked messages come back; the workers reconnect
    without exiting, and what was in flight is sent again by the schedule when its lease lapses.
    """
    submitted = submit_batch(client, small_media, JOBS, "rmq-restart")
    workers_before = {name: process.pid for name, process in stack.workers.processes.items()}
    with Progress(client.settings.redis_url, client.settings.key_prefix, submitted.job_ids) as progress:
        progress.wait_for(JOBS // 3, timeout=120)
        done_at_kill = progress.done
        stack.rabbit.kill()
        time.sleep(3)
        stack.rabbit.start()
        restored = [time.time()]
        finish(
            stack, client, progress, submitted, "rabbitmq: kill -9 + restart", tmp_path, chaos_figures,
            explained={}, restored=restored, extra={"disruptions": 1, "done_before_kill": done_at_kill},
        )  # fmt: skip
    # The same worker processes rode it out: none exited and had to be started again.
    assert {name: p.pid for name, p in stack.workers.processes.items() if p.poll() is None} == workers_before
