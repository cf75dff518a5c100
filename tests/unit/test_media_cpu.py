"""`media_work` counts the CPU the calling thread spends moving and probing bytes; the bench
subtracts it from the workers' CPU to get orchestration. Another thread's CPU (the rest of a
threads pool) and time spent waiting must not count."""

from __future__ import annotations

import threading
import time

from prometheus_client import REGISTRY

from lipsync.metrics import media_work


def counted(work: str) -> float:
    return REGISTRY.get_sample_value("lipsync_media_cpu_seconds_total", {"work": work}) or 0.0


def test_the_threads_own_cpu_is_counted() -> None:
    before = counted("test-busy")
    with media_work("test-busy"):
        started = time.thread_time()
        while time.thread_time() - started < 0.1:
            pass
    assert counted("test-busy") - before >= 0.1


def test_waiting_and_other_threads_cpu_are_not_counted() -> None:
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    other = threading.Thread(target=spin)
    other.start()
    before = counted("test-idle")
    try:
        with media_work("test-idle"):
            time.sleep(0.3)  # another thread of the pool busy all the while
    finally:
        stop.set()
        other.join()
    assert counted("test-idle") - before < 0.05
