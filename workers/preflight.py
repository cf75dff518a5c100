"""Checks at worker start that Redis is configured to keep what it acknowledged.

Only warnings: managed Redis services may forbid CONFIG GET, and a development Redis may be
set up differently on purpose. The reasons are in `config.celery`.
"""

from __future__ import annotations

import logging

import redis

from config.settings import Settings

log = logging.getLogger("lipsync.preflight")

EXPECTED = {"maxmemory-policy": "noeviction", "appendonly": "yes", "appendfsync": "always"}
WHY = {
    "maxmemory-policy": "under memory pressure Redis may evict job records, leases or queued messages",
    "appendonly": "a Redis restart loses every job written since the last snapshot",
    "appendfsync": "a Redis crash may forget the last second of writes, a submit claim included (risk of paying twice)",
}


def check_redis(settings: Settings) -> list[str]:
    """The settings that differ from what this workload needs, each as a warning (also logged)."""
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5, decode_responses=True)
    warnings = []
    try:
        for name, wanted in EXPECTED.items():
            found = client.config_get(name).get(name)
            if found is not None and found != wanted:
                warnings.append(f"Redis has {name} {found!r}, not {wanted!r}: {WHY[name]}")
    except redis.RedisError as exc:  # CONFIG disabled (managed Redis) or Redis not up yet
        log.info("could not read Redis's configuration (%s); make sure it is %s", exc, EXPECTED)
        return []
    finally:
        client.close()
    for warning in warnings:
        log.warning(warning)
    return warnings
