# mypy: disable-error-code="no-untyped-call"
# (kombu ships no type hints)
"""Losing the Redis master: Sentinel promotes the replica and our clients follow it.

Real redis-server processes (a master, a replica, three Sentinels on free ports); the master
is killed with kill -9. The figures printed here (failover time) go in docs/reliability.md.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu.connection import Connection
from kombu.entity import Exchange, Queue
from kombu.message import Message
from kombu.messaging import Consumer, Producer

from lipsync.replication import AckPolicy, ReplicaAckTimeout, acknowledge
from lipsync.sentinel import celery_broker_options, redis_from_url
from producers.devstack import stop_process
from tests.fixtures.sentinel import SentinelTopology, sentinel_topology, wait_until
from workers.broker_sentinel import TRANSPORT

__all__ = ["sentinel_topology"]  # the fixture, imported so pytest finds it

FAILOVER_DEADLINE_S = 30.0
ROOT = Path(__file__).resolve().parents[2]


def _client(topology: SentinelTopology) -> redis.Redis[Any]:
    return redis_from_url(topology.url, socket_timeout=2, socket_connect_timeout=1)


def _write_until_accepted(client: redis.Redis[Any], key: str, value: str) -> float:
    """Write through `client` until a master takes it; returns when (monotonic)."""

    def accepted() -> bool:
        return bool(client.set(key, value))

    wait_until(accepted, FAILOVER_DEADLINE_S, f"a master accepting {key}", interval=0.02)
    return time.monotonic()


def test_master_killed_same_client_writes_to_promoted_replica_and_keeps_acknowledged_write(
    sentinel_topology: SentinelTopology,
) -> None:
    topology = sentinel_topology
    client = _client(topology)
    # As the job store writes: a Lua script queued on a pipeline, acknowledged with it.
    save = client.register_script("return redis.call('HSET', KEYS[1], 'request_id', ARGV[1])")
    pipe = client.pipeline(transaction=False)
    save(keys=["lipsync:job:j1"], args=["req-1"], client=pipe)
    assert acknowledge(pipe, replicas=1, timeout_ms=5000, policy=AckPolicy.REFUSE) == [1]

    old = topology.kill_master()
    killed_at = time.monotonic()
    accepted_at = _write_until_accepted(client, "lipsync:after-failover", "1")
    failover_s = accepted_at - killed_at
    print(f"\nfailover: master killed -> first write accepted by the promoted replica in {failover_s:.2f} s")

    address = topology.wait_for_failover(old.port)
    assert address[1] == topology.master.port != old.port
    # The same client object now talks to the new master, which has the acknowledged write.
    assert client.hgetall("lipsync:job:j1") == {b"request_id": b"req-1"}
    # The new master never loaded the script: redis-py loads it again on its own.
    pipe = client.pipeline(transaction=False)
    save(keys=["lipsync:job:j2"], args=["req-2"], client=pipe)
    assert acknowledge(pipe, replicas=0, timeout_ms=1000, policy=AckPolicy.REFUSE) == [1]
    assert save(keys=["lipsync:job:j3"], args=["req-3"]) == 1
    assert topology.master.client().get("lipsync:after-failover") == b"1"
    assert failover_s < FAILOVER_DEADLINE_S


def test_no_replica_acknowledges_refuse_raises_single_host_goes_on(
    sentinel_topology: SentinelTopology, caplog: pytest.LogCaptureFixture
) -> None:
    topology = sentinel_topology
    client = _client(topology)
    topology.replica.stop()

    pipe = client.pipeline(transaction=False)
    pipe.set("lipsync:claim:j2", "worker-a")
    started = time.monotonic()
    with pytest.raises(ReplicaAckTimeout) as refused:
        acknowledge(pipe, replicas=1, timeout_ms=300, policy="refuse")
    waited = time.monotonic() - started
    assert refused.value.acknowledged == 0 and refused.value.wanted == 1
    assert 0.25 <= waited < 5, "the wait is bounded by timeout_ms"
    assert "only 0 of 1 Redis replica(s)" in str(refused.value)

    with caplog.at_level(logging.WARNING, logger="lipsync.replication"):
        for attempt in range(3):
            pipe = client.pipeline(transaction=False)
            pipe.set(f"lipsync:claim:j3-{attempt}", "worker-a")
            assert acknowledge(pipe, replicas=1, timeout_ms=100, policy=AckPolicy.SINGLE_HOST) == [True]
    warnings = [r.getMessage() for r in caplog.records if r.name == "lipsync.replication"]
    assert len(warnings) == 1 and "single-host guarantee" in warnings[0], warnings

    # The replica comes back: writes are acknowledged again, and the end of the outage is logged.
    topology.replica.start()
    wait_until(topology.replica_in_sync, 30, "the replica catching up")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lipsync.replication"):
        pipe = client.pipeline(transaction=False)
        pipe.set("lipsync:claim:j4", "worker-a")
        assert acknowledge(pipe, replicas=1, timeout_ms=5000, policy=AckPolicy.REFUSE) == [True]
    assert [r.getMessage() for r in caplog.records] == ["Redis replicas acknowledge money-critical writes again"]


def test_stalled_replica_does_not_acknowledge_a_write_it_never_received(sentinel_topology: SentinelTopology) -> None:
    """A frozen replica still counts as connected, with the offset it last acknowledged. A WAIT
    sent on another pooled connection, one whose own last write the replica had, would answer
    "acknowledged" at once: only the write's own connection tells the truth."""
    topology = sentinel_topology
    client = _client(topology)
    earlier = redis.Redis(connection_pool=client.connection_pool, single_connection_client=True)
    try:
        earlier.set("lipsync:earlier", "1")
        assert earlier.wait(1, 5000) == 1
        topology.replica.process.send_signal(signal.SIGSTOP)
        pipe = client.pipeline(transaction=False)
        pipe.set("lipsync:request-id:j5", "req-5")
        with pytest.raises(ReplicaAckTimeout):
            acknowledge(pipe, replicas=1, timeout_ms=300, policy=AckPolicy.REFUSE)
        # Why the connection matters: the other connection's WAIT acknowledges at once.
        started = time.monotonic()
        assert earlier.wait(1, 3000) == 1
        assert time.monotonic() - started < 1
    finally:
        earlier.close()
        topology.replica.process.send_signal(signal.SIGCONT)


def test_acknowledge_refuses_a_wait_it_cannot_tie_to_the_write(sentinel_topology: SentinelTopology) -> None:
    """A pooled client or a MULTI pipeline would let WAIT acknowledge without covering the write."""
    topology = sentinel_topology
    client = _client(topology)
    with pytest.raises(TypeError, match="own connection"):
        acknowledge(client, replicas=1, timeout_ms=100, policy="refuse")
    with pytest.raises(TypeError, match="transaction=False"):
        acknowledge(client.pipeline(transaction=True), replicas=1, timeout_ms=100, policy="refuse")

    # A client pinned to one connection may write first and acknowledge after.
    pinned = redis.Redis(connection_pool=client.connection_pool, single_connection_client=True)
    try:
        pinned.set("lipsync:pinned", "1")
        assert acknowledge(pinned, replicas=1, timeout_ms=5000, policy="refuse") == []
        topology.replica.stop()
        pinned.set("lipsync:pinned", "2")
        with pytest.raises(ReplicaAckTimeout):
            acknowledge(pinned, replicas=1, timeout_ms=200, policy="refuse")
    finally:
        pinned.close()


def test_plain_redis_url_still_works(sentinel_topology: SentinelTopology) -> None:
    client = redis_from_url(f"redis://127.0.0.1:{sentinel_topology.master.port}/0", socket_timeout=2)
    client.set("lipsync:plain", "yes")
    assert client.get("lipsync:plain") == b"yes"
    # With replicas 0 (the default for a single Redis) acknowledge only runs the writes.
    pipe = client.pipeline(transaction=False)
    pipe.incr("lipsync:plain-counter")
    assert acknowledge(pipe, replicas=0, timeout_ms=0, policy="refuse") == [1]


def test_celery_worker_survives_the_master_kill_and_runs_tasks_sent_after_it(
    sentinel_topology: SentinelTopology, tmp_path: Path
) -> None:
    """A real `celery worker` on the Sentinel transport: it reconnects to the promoted replica
    by itself (no restart) and runs a task sent after the kill."""
    topology = sentinel_topology
    env = {**os.environ, "LIPSYNC_TEST_SENTINEL_URL": topology.url, "PYTHONPATH": str(ROOT)}
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.fixtures.sentinel_celery_app", "worker",
             "--pool", "solo", "--queues", "sentinel-check", "--loglevel", "INFO",
             "--without-mingle", "--without-gossip", "--without-heartbeat"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        os.environ["LIPSYNC_TEST_SENTINEL_URL"] = topology.url
        from tests.fixtures import sentinel_celery_app

        store = _client(topology)

        def done() -> list[bytes]:
            return store.lrange(sentinel_celery_app.DONE_KEY, 0, -1)

        sentinel_celery_app.app.send_task("record", args=["before-kill"])
        wait_until(lambda: b"before-kill" in done(), 60, "the worker running a task before the kill")

        old = topology.kill_master()
        killed_at = time.monotonic()
        sentinel_celery_app.app.send_task("record", args=["after-kill"])
        wait_until(lambda: b"after-kill" in done(), 60, "the worker running a task sent after the kill")
        print(f"\ncelery worker: task sent after the kill ran {time.monotonic() - killed_at:.2f} s after it")
        assert worker.poll() is None, "the worker exited"
        assert topology.wait_for_failover(old.port)[1] != old.port
        assert done() == [b"before-kill", b"after-kill"]
    finally:
        stop_process(worker)
        os.environ.pop("LIPSYNC_TEST_SENTINEL_URL", None)
        if worker.returncode not in (0, -signal.SIGTERM):
            print(log_path.read_text(errors="replace")[-4000:])


def test_broker_publishes_and_consumes_across_failover(sentinel_topology: SentinelTopology) -> None:
    """kombu with celery_broker_options: a message sent before the kill is consumed after it,
    from the promoted replica, and a message sent after the kill goes through too."""
    topology = sentinel_topology
    options = celery_broker_options(topology.url, sentinel_transport=TRANSPORT)
    exchange = Exchange("lipsync-test", type="direct")
    queue = Queue("lipsync-failover", exchange, routing_key="failover")
    transport_options = {**options["broker_transport_options"], "socket_timeout": 2, "socket_connect_timeout": 1}
    received: list[str] = []

    def on_message(body: Any, message: Message) -> None:
        received.append(body["job_id"])
        message.ack()

    def drain_until(job_id: str) -> None:
        with conn.channel() as channel, Consumer(channel, [queue], callbacks=[on_message], accept=["json"]):
            deadline = time.monotonic() + FAILOVER_DEADLINE_S
            while job_id not in received and time.monotonic() < deadline:
                try:
                    conn.drain_events(timeout=0.5)
                except TimeoutError:
                    continue
            assert job_id in received, f"{job_id} was not consumed; got {received}"

    with Connection(
        options["broker_url"], transport=options["broker_transport"], transport_options=transport_options
    ) as conn:
        producer = Producer(conn.channel(), exchange, routing_key="failover", serializer="json")
        queue(producer.channel).declare()
        producer.publish({"job_id": "before-kill"})
        wait_until(topology.replica_in_sync, 10, "the message replicated")

        old = topology.kill_master()
        killed_at = time.monotonic()
        # As Celery publishes: retried through kombu's ensure, which reconnects via the Sentinels.
        publish = conn.ensure(producer, producer.publish, max_retries=60, interval_start=0.1, interval_step=0.1)
        publish({"job_id": "after-kill"})
        published_s = time.monotonic() - killed_at
        drain_until("before-kill")
        drain_until("after-kill")
        consumed_s = time.monotonic() - killed_at
    print(f"\nbroker failover: published {published_s:.2f} s after the kill, both consumed at {consumed_s:.2f} s")
    assert topology.wait_for_failover(old.port)[1] != old.port
    assert sorted(received) == ["after-kill", "before-kill"]


def test_a_retried_money_critical_write_is_rewritten_so_wait_covers_it(sentinel_topology: SentinelTopology) -> None:
    """The submit claim (or the request id) written by an earlier try: the retry writes nothing
    new of its own, so its WAIT would answer for nothing. `JobStore.confirm` rewrites the field
    on the WAIT's connection: with the replica frozen, it is refused, not acknowledged at once."""
    from lipsync.jobstore import JobStore
    from lipsync.replication import ReplicaAck

    topology = sentinel_topology
    store = JobStore(_client(topology), "acked", ack=ReplicaAck(1, 300, AckPolicy.REFUSE))
    store.redis.hset(store.job_key("j1"), "submit_claimed_at", "1.5")
    assert store.confirm("j1", ["submit_claimed_at"]) == 1  # replica live: acknowledged
    assert store.confirm("j1", ["no_such_field"]) == 0  # a claim a failover lost: nothing to go on with
    topology.replica.process.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(ReplicaAckTimeout):
            store.confirm("j1", ["submit_claimed_at"])
        single_host = JobStore(store.redis, "acked", ack=ReplicaAck(1, 300, AckPolicy.SINGLE_HOST))
        assert single_host.confirm("j1", ["submit_claimed_at"]) == 1
    finally:
        topology.replica.process.send_signal(signal.SIGCONT)
    assert store.redis.hget(store.job_key("j1"), "submit_claimed_at") == b"1.5"


def test_submit_sends_nothing_to_fal_until_a_replica_has_its_claim(
    sentinel_topology: SentinelTopology, stack_env: dict[str, str], emulator: Any
) -> None:
    """With the replica frozen, a failover could forget the claim: the submit step sends nothing,
    takes the claim back (the next try is a fresh submit, not an "interrupted POST") and waits;
    once the replica answers, the job is submitted once."""
    from config.settings import Settings
    from lipsync.lifecycle import step
    from lipsync.models import Job, JobStatus, LipsyncInput, MediaInfo
    from workers.context import build_context
    from workers.runner import run_step
    from workers.submit import CLAIM_FIELD, submit

    topology = sentinel_topology
    settings = Settings(
        redis_url=topology.url, key_prefix=f"acksubmit{time.time_ns()}",
        redis_min_replicas_ack=1, redis_ack_timeout_ms=300, redis_ack_policy="refuse",
    )  # fmt: skip
    ctx = build_context(settings, send=lambda *message: None)
    now = time.time()
    media = MediaInfo(staging_key="staging/x", sha256="0" * 64, size=1, container="mp4", duration=3.0)
    job = Job(
        id=ctx.store.new_id(), status=JobStatus.queued, request=LipsyncInput(video_url="s3://b/v", audio_url="s3://b/a"),
        request_digest="d", created_at=now, updated_at=now, deadline_at=now + 600,
        inputs={"video": media, "audio": media},
    )  # fmt: skip
    ctx.store.create(job, dispatch_lease_s=3600)
    inputs = {k: v.model_dump(mode="json") for k, v in job.inputs.items()}
    ctx.store.advance(job.id, JobStatus.submitting, from_=[JobStatus.queued], fields={"inputs": inputs}, due_at=now)
    created = emulator.counters()["by_marker"].get(job.id, 0)
    topology.replica.process.send_signal(signal.SIGSTOP)
    try:
        run_step(step("submit"), job.id, ctx, submit)
        waiting = ctx.store.get(job.id)
        assert waiting.status is JobStatus.submitting and waiting.fal is None
        assert ctx.store.raw_field(job.id, CLAIM_FIELD) is None  # taken back
        assert ctx.admission.in_flight() == 0  # and the slot
        assert emulator.counters()["by_marker"].get(job.id, 0) == created  # nothing sent to fal
        assert ctx.store.scheduled_at(job.id) is not None  # it will be tried again
    finally:
        topology.replica.process.send_signal(signal.SIGCONT)
    run_step(step("submit"), job.id, ctx, submit)
    submitted = ctx.store.get(job.id)
    assert submitted.status is JobStatus.submitted and submitted.fal is not None
    assert emulator.counters()["by_marker"].get(job.id, 0) == created + 1
    ctx.redis.close()
