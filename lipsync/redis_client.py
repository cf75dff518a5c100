"""The one Redis client factory: every process (worker, poller, producer, gateway) connects here,
with the same explicit timeouts, so a Redis that hangs is noticed the same way everywhere. A
`sentinel://` URL gives a client that follows the master through a Sentinel failover
(`lipsync.sentinel`)."""

from __future__ import annotations

import redis

from lipsync.sentinel import redis_from_url

# A command answers in milliseconds; 10 s means Redis is gone or stuck, not slow.
SOCKET_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0
# Idle pooled connections are checked before use after this long (a restarted Redis, a NAT drop).
HEALTH_CHECK_INTERVAL_S = 30


def connect(url: str, *, socket_timeout_s: float = SOCKET_TIMEOUT_S) -> redis.Redis[bytes]:
    """A client for `url`. Create one per process (after the fork) and share it: it is a pool."""
    return redis_from_url(
        url,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=min(CONNECT_TIMEOUT_S, socket_timeout_s),
        health_check_interval=HEALTH_CHECK_INTERVAL_S,
    )
