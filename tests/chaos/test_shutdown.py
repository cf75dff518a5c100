"""Graceful shutdown: SIGTERM lets the transfers in flight finish and hands the rest back.

The inputs come from a deliberately slow web server, so that every transfer thread is in
the middle of a download, with more jobs waiting, when the worker is told to stop (as `docker stop` or a
Kubernetes rollout would). What they were doing must finish exactly once; what they had
not started must be picked up by the next worker; nothing fails and every output is whole.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from lipsync.models import JobStatus, SyncMode, output_duration
from producers.devstack import DEFAULT_WORKERS, free_port
from tests.chaos.conftest import ChaosStack
from tests.chaos.harness import Progress, Submitted, queued_job_ids, verify
from tests.fixtures.isolated import kill_group

pytestmark = pytest.mark.slow

SLOW_SECONDS = 4.0


class SlowHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    body = b""

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        step = max(1, len(self.body) // 40)
        try:
            for start in range(0, len(self.body), step):
                self.wfile.write(self.body[start : start + step])
                self.wfile.flush()
                time.sleep(SLOW_SECONDS / 40)
        except OSError:
            pass


@pytest.fixture
def slow_server(small_media: Any) -> Iterator[str]:
    SlowHandler.body = Path(small_media["video_long"][0]).read_bytes()
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), SlowHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/slow.mp4"
    server.shutdown()


def test_sigterm_lets_in_flight_transfers_finish_and_hands_the_rest_back(
    chaos_stack: ChaosStack,
    slow_server: str,
    small_media: Any,
    tmp_path: Path,
    chaos_figures: list[dict[str, Any]],
) -> None:
    from producers.api import LipsyncClient

    stack = chaos_stack
    stack.emulator.reset()
    stack.emulator.configure(latency="0.5-1", retention_large=360)
    stack.start_workers()
    client = LipsyncClient(stack.settings())
    audio, audio_s = small_media["audio_short"]
    try:
        # More jobs than the transfer worker has threads: some must still be waiting at SIGTERM,
        # or "the rest is handed back" would hold with nothing to hand back.
        threads = next(spec.concurrency for spec in DEFAULT_WORKERS if spec.name == "transfer")
        jobs = [client.submit(slow_server, audio, sync_mode=SyncMode.cut_off.value) for _ in range(threads + 6)]
        submitted = Submitted(
            [job.id for job in jobs],
            {job.id: output_duration(SyncMode.cut_off, 2.0, audio_s) for job in jobs},
            time.time(),
        )
        with Progress(client.settings.redis_url, client.settings.key_prefix, submitted.job_ids) as progress:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                staging = [i for i, s in client.store.statuses(submitted.job_ids).items() if s is JobStatus.staging]
                if len(staging) >= threads:
                    break
                time.sleep(0.05)
            assert len(staging) >= threads, f"every transfer thread should be downloading ({len(staging)}/{threads})"
            time.sleep(0.5)
            transfer = stack.workers.processes["transfer"]
            transfer_log = stack.logdir / "worker-transfer.log"
            log_start = transfer_log.stat().st_size
            terminated_at = time.time()
            transfer.send_signal(signal.SIGTERM)
            exit_code = transfer.wait(60)
            with transfer_log.open("rb") as handle:
                handle.seek(log_start)
                shutdown_log = handle.read().decode(errors="replace")
            stopped_s = round(time.time() - terminated_at, 1)
            in_flight = client.store.get_many(staging)
            # What was in flight finished, once: staged and on its way to fal, not interrupted.
            assert exit_code == 0, "a warm shutdown exits cleanly"
            for job in in_flight:
                assert job.status not in (JobStatus.queued, JobStatus.staging, JobStatus.failed), job
                assert job.attempts.get("stage") == 1, job.attempts
            left = [i for i, s in client.store.statuses(submitted.job_ids).items() if s is JobStatus.queued]
            # Everything not started was handed back: queued, its message in the queue again.
            assert len(left) == len(jobs) - len(in_flight), (len(left), len(in_flight))
            assert left, "nothing was waiting at SIGTERM: the test proves no hand-back"
            waiting = queued_job_ids(stack.env["LIPSYNC_REDIS_URL"], "lipsync.stage")
            assert set(left) <= waiting, f"{len(set(left) - waiting)} jobs were not handed back to the queue"
            stack.start_workers()
            restarted_at = time.time()
            assert progress.wait_all(120)
        verdict = verify(
            client,
            stack.emulator,
            submitted,
            scenario="SIGTERM transfer worker",
            explained={},
            tmp_path=tmp_path,
            extra={
                "disruptions": 1,
                "in_flight_at_sigterm": len(in_flight),
                "handed_back": len(left),
                "shutdown_s": stopped_s,
                "recovery_s": progress.recovery_after(restarted_at),
            },
        )
    finally:
        client.close()
    chaos_figures.append(verdict.figures)
    assert not verdict.problems, verdict.problems
    assert verdict.figures["completed"] == len(jobs)
    assert all(job.attempts.get("stage") == 1 for job in verdict.jobs), "no transfer was run twice"
    assert "Warm shutdown" in shutdown_log and "WorkerLostError" not in shutdown_log


def test_worker_killed_mid_upload_never_reports_a_half_written_output(
    chaos_stack: ChaosStack, small_media: Any, tmp_path: Path, chaos_figures: list[dict[str, Any]]
) -> None:
    """Uploads to S3 slowed to a crawl, the transfer worker killed (-9) while outputs are half sent:
    no object appears for them, no job is completed, and the rerun stores them whole."""
    from producers.api import LipsyncClient

    stack = chaos_stack
    stack.emulator.reset()
    stack.emulator.configure(latency="0.5-1", retention_large=360)
    stack.start_workers()
    client = LipsyncClient(stack.settings())
    (video, video_s), (audio, audio_s) = small_media["video_long"], small_media["audio_long"]
    try:
        jobs = [client.submit(video, audio, sync_mode=SyncMode.cut_off.value) for _ in range(6)]
        ids = [job.id for job in jobs]
        expected = output_duration(SyncMode.cut_off, video_s, audio_s)
        submitted = Submitted(ids, dict.fromkeys(ids, expected), time.time())
        early = {JobStatus.queued, JobStatus.staging, JobStatus.submitting}
        deadline = time.monotonic() + 60
        while any(s in early for s in client.store.statuses(ids).values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        stack.s3_proxy.upload_rate = 3000  # bytes/s: each output takes seconds to send
        storing_since: dict[str, float] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            now = time.monotonic()
            for job_id, status in client.store.statuses(ids).items():
                if status is JobStatus.storing:
                    storing_since.setdefault(job_id, now)
            if sum(now - since >= 1.5 for since in storing_since.values()) >= 2:
                break
            time.sleep(0.05)
        transfer = stack.workers.processes.pop("transfer")
        kill_group(transfer)
        interrupted = [i for i, s in client.store.statuses(ids).items() if s is JobStatus.storing]
        # A job whose store was running holds a lease; the others' messages were still queued.
        uploading = [i for i in interrupted if client.store.raw_field(i, "lease_owner") is not None]
        assert uploading, "the kill should land while outputs are being uploaded"
        for job_id in interrupted:
            assert client.storage.head(f"outputs/{job_id}.mp4") is None, "a half-sent output became visible"
        stack.s3_proxy.upload_rate = 0
        with Progress(client.settings.redis_url, client.settings.key_prefix, ids) as progress:
            stack.start_workers()
            restarted_at = time.time()
            assert progress.wait_all(120)
        verdict = verify(
            client,
            stack.emulator,
            submitted,
            scenario="kill -9 mid-upload",
            explained={},
            tmp_path=tmp_path,
            extra={
                "disruptions": 1,
                "storing_at_kill": len(interrupted),
                "uploads_interrupted": len(uploading),
                "last_job_after_restart_s": round(max(progress.terminal_at.values()) - restarted_at, 1),
                "recovery_s": progress.recovery_after(restarted_at),
            },
        )
    finally:
        stack.s3_proxy.upload_rate = 0
        client.close()
    chaos_figures.append(verdict.figures)
    assert not verdict.problems, verdict.problems
    assert verdict.figures["completed"] == len(ids)
