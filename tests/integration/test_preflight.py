"""The worker's start-up check: Redis must keep what it acknowledged, or the operator is told."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from config.settings import Settings
from producers.devstack import free_port, start_redis, stop_process, wait_for_port
from workers.preflight import check_redis


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
