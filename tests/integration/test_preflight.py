"""The worker's start-up check: Redis must keep what it acknowledged, or the operator is told."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import time
from pathlib import Path

from config.settings import Settings
from producers.devstack import free_port, start_redis, stop_process, wait_for_port
from workers.preflight import check_redis, check_worker


def test_the_dev_stack_redis_passes_the_check() -> None:
    with start_redis() as server:
        assert check_redis(Settings(redis_url=server.url)) == []


def test_a_redis_that_may_forget_or_evict_is_reported(tmp_path: Path) -> None:
    port = free_port()
    binary = shutil.which("redis-server")
    assert binary is not None
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--dir",
            str(tmp_path),
            "--save",
            "",
            "--appendonly",
            "no",
            "--maxmemory-policy",
            "allkeys-lru",
        ],  # fmt: skip
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, process=process)
        warnings = check_redis(Settings(redis_url=f"redis://127.0.0.1:{port}/0"))
    finally:
        stop_process(process)
    assert any("maxmemory-policy 'allkeys-lru'" in w and "evict" in w for w in warnings)
    assert any("appendonly 'no'" in w for w in warnings)


def test_an_unreachable_redis_is_not_a_start_up_failure() -> None:
    assert check_redis(Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")) == []


def test_a_missing_bucket_is_said_at_once_and_an_unreachable_s3_does_not_stop_the_worker(
    stack_env: dict[str, str],
) -> None:
    bucket = f"no-such-bucket-{secrets.token_hex(4)}"
    started = time.monotonic()
    problems = check_worker(Settings(s3_bucket=bucket))
    # Not waited for (the check once slept up to 20 s hoping it would appear): a local S3 answers
    # in milliseconds, so 10 s is a bound no machine comes near, not a race.
    assert time.monotonic() - started < 10
    assert len(problems) == 1 and f"the bucket '{bucket}' does not exist" in problems[0], problems

    # Nothing listens there: asked again a few times, then the worker may start (the stages retry S3).
    assert check_worker(Settings(s3_endpoint_url=f"http://127.0.0.1:{free_port()}")) == []
    assert check_worker(Settings()) == []  # the stack's own bucket
