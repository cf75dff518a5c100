"""Checks at worker start.

- Misconfiguration that would fail every job (no `FAL_KEY` against the real fal, a bucket that
  does not exist): the worker refuses to start, saying so in one line, before taking a job.
- Redis configured to keep what it acknowledged: only warnings, as managed Redis services may
  forbid CONFIG GET, and a development Redis may be set up differently on purpose. The reasons
  are in `config.celery`.
"""

from __future__ import annotations

import logging
import sys

import redis

from config.settings import Settings
from lipsync.sentinel import redis_from_url

log = logging.getLogger("lipsync.preflight")

EXPECTED = {"maxmemory-policy": "noeviction", "appendonly": "yes", "appendfsync": "always"}
WHY = {
    "maxmemory-policy": "under memory pressure Redis may evict job records, leases or queued messages",
    "appendonly": "a Redis restart loses every job written since the last snapshot",
    "appendfsync": "a Redis crash may forget the last second of writes, a submit claim included (risk of paying twice)",
}


def check_redis(settings: Settings) -> list[str]:
    """The settings that differ from what this workload needs, each as a warning (also logged)."""
    client = redis_from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5, decode_responses=True)
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


# S3 that does not answer at start (restarting, not up yet) is asked again with botocore's own
# backoff, this many attempts in all (a few seconds when the port is closed, at most about a minute
# when it hangs); then the worker starts anyway, and its stages retry S3 like any transient error.
S3_ATTEMPTS = 4


class WorkerMisconfigured(SystemExit):
    """The worker cannot do any job as configured: it stops before taking one (exit status 78)."""


def check_worker(settings: Settings) -> list[str]:
    """What makes every job fail as configured, each in one line; empty when the worker may start."""
    from lipsync.checks import bucket_problem, fal_key_problem
    from lipsync.storage import Storage

    # A bucket that does not exist is said at once, not waited for: every deployment of this project
    # makes it before the workers start (compose's minio-init, `lipsync dev up`, the test fixtures).
    storage = Storage(settings, max_attempts=S3_ATTEMPTS, connect_timeout_s=2, read_timeout_s=10)
    problems = [fal_key_problem(settings), bucket_problem(storage)]
    return [problem for problem in problems if problem]


def refuse_to_start_misconfigured(settings: Settings) -> None:
    """Connected to `worker_init` (`workers.app`): before the worker consumes anything."""
    problems = check_worker(settings)
    for problem in problems:
        # Straight to stderr as well: logging may not be configured yet, and this is the one line
        # an operator must see.
        print(f"lipsync worker: cannot start: {problem}", file=sys.stderr, flush=True)
    if problems:
        raise WorkerMisconfigured(78)  # EX_CONFIG: a process manager should not restart it in a loop
