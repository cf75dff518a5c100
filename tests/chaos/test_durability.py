"""Why Redis runs with `appendfsync always`: an acknowledged write survives a crash that loses the page cache.

`kill -9` of redis-server alone proves nothing here: the kernel keeps what Redis wrote, and
`everysec` comes back as complete as `always`. A power cut or a kernel crash loses the page
cache too. `lost_page_cache.c`, preloaded into redis-server, keeps the append-only file's
unsynced writes in the process's own memory, so that `kill -9` loses exactly those. Under it,
`everysec` loses acknowledged writes (for us: a submit claim, so a rerun would POST again and
pay twice) and `always` loses none.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from producers.devstack import free_port, stop_process, wait_for_port
from tests.chaos.conftest import spawn_durable_redis

pytestmark = pytest.mark.slow

SHIM_SOURCE = Path(__file__).with_name("lost_page_cache.c")


@pytest.fixture(scope="module")
def lost_page_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.fail("a C compiler (cc) is needed to build the page-cache shim: apt-get install gcc")
    target = tmp_path_factory.mktemp("shim") / "lost_page_cache.so"
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-O1", "-o", str(target), str(SHIM_SOURCE), "-ldl", "-lpthread"],
        check=True,
        capture_output=True,
    )
    return target


class CrashableRedis:
    """The chaos suite's own redis-server (same options), with the shim preloaded."""

    def __init__(self, shim: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.shim, self.workdir, self.monkeypatch = shim, workdir, monkeypatch
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> redis.Redis:
        """Start (again) on a port of its own: the data is in `workdir`, the old port may be taken."""
        self.port = free_port()
        with self.monkeypatch.context() as patch:
            patch.setenv("LD_PRELOAD", str(self.shim))
            self.process = spawn_durable_redis(self.port, self.workdir)
        wait_for_port(self.port, process=self.process)
        client = redis.Redis(port=self.port, socket_timeout=10)
        deadline = time.monotonic() + 30
        while client.info("persistence").get("loading", 0) and time.monotonic() < deadline:
            time.sleep(0.05)
        return client

    def crash(self) -> None:
        """A crash that takes the page cache with it: the process dies with its unsynced writes."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


@pytest.fixture
def crashable(lost_page_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[CrashableRedis]:
    server = CrashableRedis(lost_page_cache, tmp_path, monkeypatch)
    yield server
    server.stop()


def acknowledged_then_crash(server: CrashableRedis, fsync: str) -> tuple[int, int]:
    """Write until well past one fsync interval, crash right after the last acknowledgement, restart.

    Returns (writes Redis acknowledged, writes found after the restart).
    """
    client = server.start()
    client.config_set("appendfsync", fsync)
    assert client.config_get("appendonly")["appendonly"] == "yes"
    acknowledged = 0
    until = time.monotonic() + 1.5  # spans at least one of everysec's background fsyncs
    while time.monotonic() < until:
        acknowledged = int(client.incr("claims"))
    server.crash()
    client.close()
    client = server.start()
    found = int(client.get("claims") or 0)
    client.close()
    server.stop()
    return acknowledged, found


def test_appendfsync_always_keeps_every_acknowledged_write_through_a_crash_that_loses_the_page_cache(
    crashable: CrashableRedis,
) -> None:
    acknowledged, found = acknowledged_then_crash(crashable, "always")
    assert acknowledged > 100
    assert found == acknowledged, f"{acknowledged - found} acknowledged writes lost"


def test_appendfsync_everysec_loses_acknowledged_writes_in_the_same_crash(crashable: CrashableRedis) -> None:
    """The control: the crash is real enough to tell the two apart (else the test above proves nothing)."""
    acknowledged, found = acknowledged_then_crash(crashable, "everysec")
    assert found < acknowledged, "everysec kept every write: the simulated crash kept the page cache"


def test_the_chaos_suite_and_compose_run_redis_with_appendfsync_always(tmp_path: Path) -> None:
    port = free_port()
    process = spawn_durable_redis(port, tmp_path)
    try:
        wait_for_port(port, process=process)
        client = redis.Redis(port=port)
        assert client.config_get("appendfsync")["appendfsync"] == "always"
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        client.close()
    finally:
        stop_process(process)
