"""Replica acknowledgement of the money-critical writes (the submit claim, the fal request id).

Redis replicates asynchronously: a master that dies right after a write can take the write
with it, and Sentinel then promotes a replica that never saw it. Redis `WAIT numreplicas
timeout` blocks until that many replicas have the client's writes so far, which closes the
gap for the writes where forgetting one means paying fal twice.

WAIT counts the writes *of its own connection*. Through a connection pool, a WAIT sent as a
second command may go out on another connection, whose own last write is older (or none), and
answer "acknowledged" at once for a write it never covered (a frozen replica shows it:
tests/integration/test_sentinel.py). So the write and its WAIT are queued on one
non-transactional pipeline and sent together: one connection, one round trip, and if the
connection breaks, redis-py retries the pair, never the WAIT alone on a fresh connection (which
would again acknowledge nothing). Not a MULTI/EXEC pipeline: inside MULTI, WAIT does not block;
it answers at once (0 on Redis 7.0, even with the replica in sync).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import redis
from redis.client import Pipeline

from lipsync.errors import RetryableError

if TYPE_CHECKING:
    from config.settings import Settings

log = logging.getLogger("lipsync.replication")


class AckPolicy(StrEnum):
    """What a money-critical write does when no replica acknowledges it in time."""

    # Do not go on: the caller raises, nothing is sent to fal, the step is retried later.
    REFUSE = "refuse"
    # Go on with the single-host guarantee (AOF with fsync on the master); logged once per outage.
    SINGLE_HOST = "single_host"


class ReplicaAckTimeout(RetryableError):
    """Fewer replicas than required acknowledged a write within the timeout (policy `refuse`)."""

    code = "replica_ack_timeout"

    def __init__(self, message: str, *, wanted: int, acknowledged: int) -> None:
        super().__init__(message)
        self.wanted = wanted
        self.acknowledged = acknowledged


class _OutageLog:
    """Logs the start and the end of a stretch of unacknowledged writes, not every write."""

    def __init__(self) -> None:
        self.in_outage = False

    def missed(self, wanted: int, acknowledged: int, timeout_ms: int) -> None:
        if not self.in_outage:
            self.in_outage = True
            log.warning(
                "only %d of %d Redis replica(s) acknowledged a money-critical write within %d ms; going on "
                "with the single-host guarantee (policy single_host) until they answer again",
                acknowledged,
                wanted,
                timeout_ms,
            )

    def acknowledged(self) -> None:
        if self.in_outage:
            self.in_outage = False
            log.warning("Redis replicas acknowledge money-critical writes again")


_outage = _OutageLog()


def acknowledge(
    client: Pipeline[Any] | redis.Redis[Any],
    *,
    replicas: int,
    timeout_ms: int,
    policy: AckPolicy | str,
) -> list[Any]:
    """Make the writes on `client` durable on `replicas` replicas, waiting at most `timeout_ms`.

    `client` is either a non-transactional pipeline holding the writes (they are sent now,
    followed by WAIT on the same connection; their results are returned, WAIT's left out), or
    a client pinned to one connection (`single_connection_client=True`) that has just written
    (WAIT is sent on it; returns []). With `replicas` 0 the pipeline is only executed.

    Too few acknowledgements: policy `refuse` raises ReplicaAckTimeout (a RetryableError; the
    writes did reach the master), policy `single_host` logs once per outage and returns.
    """
    policy = AckPolicy(policy)
    if replicas < 0:
        raise ValueError(f"replicas must be 0 or more, not {replicas}")
    if replicas and timeout_ms <= 0:
        # WAIT with timeout 0 blocks forever: a lost replica would stop every submit.
        raise ValueError(f"timeout_ms must be more than 0 when waiting for replicas, not {timeout_ms}")
    if isinstance(client, Pipeline):
        if client.transaction:
            raise TypeError(
                "acknowledge needs a pipeline made with transaction=False: inside MULTI/EXEC, WAIT does not wait"
            )
        if not replicas:
            return client.execute()
        client.wait(replicas, timeout_ms)
        *results, acknowledged = client.execute()
    else:
        if getattr(client, "connection", None) is None:
            raise TypeError(
                "acknowledge needs the writes' own connection: pass a pipeline(transaction=False) holding "
                "them, or a client made with single_connection_client=True"
            )
        results = []
        if not replicas:
            return results
        acknowledged = client.wait(replicas, timeout_ms)
    _check(int(acknowledged), replicas=replicas, timeout_ms=timeout_ms, policy=policy)
    return results


def _check(acknowledged: int, *, replicas: int, timeout_ms: int, policy: AckPolicy) -> None:
    if acknowledged >= replicas:
        _outage.acknowledged()
        return
    if policy is AckPolicy.SINGLE_HOST:
        _outage.missed(replicas, acknowledged, timeout_ms)
        return
    raise ReplicaAckTimeout(
        f"only {acknowledged} of {replicas} Redis replica(s) acknowledged the write within {timeout_ms} ms; "
        "not going on, so that a Redis failover cannot forget it (policy refuse)",
        wanted=replicas,
        acknowledged=acknowledged,
    )


@dataclass(frozen=True)
class ReplicaAck:
    """How the money-critical writes are acknowledged: by `replicas` replicas within `timeout_ms`."""

    replicas: int
    timeout_ms: int
    policy: AckPolicy

    @classmethod
    def from_settings(cls, settings: Settings) -> ReplicaAck | None:
        """None when no acknowledgement is asked for (`redis_min_replicas_ack` 0, a single Redis)."""
        if settings.redis_min_replicas_ack <= 0:
            return None
        return cls(settings.redis_min_replicas_ack, settings.redis_ack_timeout_ms, AckPolicy(settings.redis_ack_policy))

    def acknowledge(self, pipeline: Pipeline[Any]) -> list[Any]:
        return acknowledge(pipeline, replicas=self.replicas, timeout_ms=self.timeout_ms, policy=self.policy)
