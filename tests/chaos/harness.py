"""What every chaos scenario does: submit a mixed batch, disrupt, wait, then check the promises.

The checks are the users' three questions: is every job accounted for (terminal, nothing
left in the schedule), was anything paid for twice (every fal request the emulator created,
whatever header it carried, must belong to a job that recorded it, or to a job that failed
saying its submit answer was lost), and is every completed output really in S3 with the
length its sync_mode gives. Failures are counted, not only their kinds: each scenario says
how many of each kind its injected faults can explain, and any more is a broken promise.
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis

from lipsync.fal import download_failure
from lipsync.jobstore import JobStore
from lipsync.models import Job, JobStatus, SyncMode, output_duration
from lipsync.probe import probe
from lipsync.sentinel import redis_from_url

FRAME = 1 / 25
MODES = list(SyncMode)


@dataclass
class Submitted:
    job_ids: list[str]
    expected: dict[str, float]  # output length each job's sync_mode gives
    started: float


def submit_batch(client: Any, media: dict[str, tuple[str, float]], count: int, batch_id: str) -> Submitted:
    """`count` jobs cycling through every sync mode and both length orders."""
    videos = [media["video_short"], media["video_long"]]
    audios = [media["audio_long"], media["audio_short"]]
    job_ids, expected = [], {}
    started = time.time()
    for index in range(count):
        mode = MODES[index % len(MODES)]
        (video, video_s), (audio, audio_s) = videos[index % 2], audios[(index // 5) % 2]
        job = client.submit(video, audio, sync_mode=mode.value, batch_id=batch_id)
        job_ids.append(job.id)
        expected[job.id] = output_duration(mode, video_s, audio_s)
    return Submitted(job_ids, expected, started)


class Progress:
    """Samples how many of the batch are terminal, through Redis outages, to time recoveries."""

    def __init__(self, redis_url: str, prefix: str, job_ids: list[str]) -> None:
        self.store = JobStore(redis_from_url(redis_url, socket_timeout=2, socket_connect_timeout=1), prefix)
        self.job_ids = job_ids
        self.samples: list[tuple[float, int]] = []  # (time, terminal count) at each change
        self.terminal_at: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(redis.RedisError):
                statuses = self.store.statuses([i for i in self.job_ids if i not in self.terminal_at])
                now = time.time()
                for job_id, status in statuses.items():
                    if status is not None and status.terminal:
                        self.terminal_at[job_id] = now
                if not self.samples or self.samples[-1][1] != len(self.terminal_at):
                    self.samples.append((now, len(self.terminal_at)))
            self._stop.wait(0.2)

    @property
    def done(self) -> int:
        return len(self.terminal_at)

    def wait_for(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.done < count and time.monotonic() < deadline:
            time.sleep(0.1)

    def wait_all(self, timeout: float) -> bool:
        self.wait_for(len(self.job_ids), timeout)
        return self.done == len(self.job_ids)

    def recovery_after(self, moment: float) -> float | None:
        """Seconds from `moment` (a service back) until the next job reached its end."""
        for at, _ in self.samples:
            if at > moment:
                return round(at - moment, 2)
        return None


@dataclass
class Verdict:
    jobs: list[Job]
    figures: dict[str, Any]
    problems: list[str] = field(default_factory=list)


def verify(
    client: Any,
    emulator: Any,
    submitted: Submitted,
    *,
    scenario: str,
    explained: Mapping[str, int],
    tmp_path: Path,
    extra: dict[str, Any] | None = None,
) -> Verdict:
    """Check every promise for this batch; collect the figures the issue note quotes.

    `explained` is, per failure code, how many failures of that kind the scenario's faults
    can cause; a code not named there may not occur at all. The emulator must have been
    reset before the batch, so that every request it lists is this batch's.
    """
    jobs = client.store.get_many(submitted.job_ids)
    by_id = {job.id: job for job in jobs}
    counters = emulator.counters()
    by_marker: dict[str, int] = counters["by_marker"]
    problems: list[str] = []
    lost = [job_id for job_id in submitted.job_ids if job_id not in by_id or not by_id[job_id].terminal]
    for job_id in lost:
        status = by_id[job_id].status.value if job_id in by_id else "missing"
        problems.append(f"job {job_id} is {status}, not terminal")
    # Paid once, counted by what fal received: not by our own X-Lipsync-Job-Id header.
    ours = set(submitted.job_ids)
    created = [r for r in emulator.requests() if r["marker"] is None or r["marker"] in ours]
    recorded = {job.fal.request_id for job in jobs if job.fal is not None}
    unknown_answers = sum(
        1 for job in jobs if job.status is JobStatus.failed and job.error and job.error.code == "submit_outcome_unknown"
    )
    # A request fal ended because it could not download the inputs (the model never ran) is left
    # behind by design when its job is submitted again: each such extra request must be one that
    # fal failed with file_download_error, and its job must have counted the resubmission.
    unrecorded = [r for r in created if r["id"] not in recorded]
    resubmitted = [r for r in unrecorded if r["status"] == "COMPLETED" and _failed_download(emulator, r["id"])]
    resubmitted_by_job: dict[str, int] = {}
    for request in resubmitted:
        resubmitted_by_job[request["marker"]] = resubmitted_by_job.get(request["marker"], 0) + 1
    for job_id, count in resubmitted_by_job.items():
        counted = by_id[job_id].attempts.get("input_download", 0) if job_id in by_id else 0
        if count > counted:
            problems.append(f"job {job_id} left {count} failed downloads at fal but counted {counted} resubmissions")
    orphans = [r for r in unrecorded if r not in resubmitted]
    missing_at_fal = recorded - {r["id"] for r in created}
    duplicates = max(0, len(orphans) - unknown_answers)
    if duplicates:
        problems.append(
            f"{len(orphans)} fal requests belong to no job's record but only {unknown_answers} submits "
            f"ended with a lost answer: {duplicates} paid twice"
        )
    if missing_at_fal:
        problems.append(f"{len(missing_at_fal)} recorded request ids were never created at fal")
    marked_twice = sum(
        max(0, by_marker.get(job_id, 0) - 1 - resubmitted_by_job.get(job_id, 0)) for job_id in submitted.job_ids
    )
    if marked_twice:
        problems.append(f"{marked_twice} jobs sent more than one fal request")
    # Never two model runs for one job: at most one request per job that fal completed without an error.
    succeeded: dict[str, int] = {}
    for request in created:
        if request["status"] == "COMPLETED" and request["error_type"] is None and request["marker"]:
            succeeded[request["marker"]] = succeeded.get(request["marker"], 0) + 1
    ran_twice = [job_id for job_id, count in succeeded.items() if count > 1]
    if ran_twice:
        problems.append(f"{len(ran_twice)} jobs had the model run more than once at fal: {ran_twice[:5]}")
    for job in jobs:
        if client.store.scheduled_at(job.id) is not None and job.terminal:
            problems.append(f"job {job.id} is {job.status.value} but still in the schedule")
    failures: dict[str, int] = {}
    for job in jobs:
        if job.status is JobStatus.failed:
            assert job.error is not None
            failures[job.error.code] = failures.get(job.error.code, 0) + 1
            if job.error.code not in explained:
                problems.append(f"job {job.id} failed with an unexpected {job.error.code}: {job.error.message}")
            if job.error.code == "fal_error" and not job.error.fal_error_type:
                problems.append(f"job {job.id} failed at fal without fal's error type: {job.error.message}")
            if job.error.code in ("fal_error", "fal_validation_error") and "fal" not in job.error.message:
                problems.append(f"job {job.id}: the error does not carry fal's words: {job.error.message}")
        elif job.status is JobStatus.completed:
            problems.extend(check_output(client, job, submitted.expected[job.id], tmp_path))
    for code, count in failures.items():
        if code in explained and count > explained[code]:
            problems.append(f"{count} jobs failed as {code}; the injected faults explain at most {explained[code]}")
    retries = sum(v for job in jobs for k, v in job.attempts.items() if k.startswith("retry_"))
    ends = [job.timestamps.get(job.status.value, job.updated_at) for job in jobs if job.terminal]
    figures = {
        "scenario": scenario,
        "jobs": len(submitted.job_ids),
        "completed": sum(job.status is JobStatus.completed for job in jobs),
        "failed": sum(job.status is JobStatus.failed for job in jobs),
        "failures_by_code": failures,
        "fal_requests": len(created),
        "resubmitted_after_failed_download": len(resubmitted),
        "faults_injected": counters.get("faults_injected", {}),
        "retries": retries,
        "duplicates": duplicates,
        "lost": len(lost),
        "batch_s": round(max(ends) - submitted.started, 1) if ends else None,
        **(extra or {}),
    }
    return Verdict(jobs, figures, problems)


def _failed_download(emulator: Any, request_id: str) -> bool:
    """fal (the emulator) ended this request with file_download_error: it could not fetch an input."""
    try:
        found = emulator.inspect(request_id)
    except Exception:  # swept by retention: not provably a failed download
        return False
    return download_failure(found.get("error_body")) is not None


def check_output(client: Any, job: Job, expected: float, tmp_path: Path) -> list[str]:
    assert job.output is not None
    key = job.output.url.split("/", 3)[3]
    head = client.storage.head(key)
    if head is None:
        return [f"job {job.id} is completed but {job.output.url} does not exist"]
    if int(head["ContentLength"]) != job.output.file_size:
        return [
            f"job {job.id}: {job.output.url} is {head['ContentLength']} bytes, the record says {job.output.file_size}"
        ]
    target = tmp_path / f"{job.id}.mp4"
    with target.open("wb") as handle:
        client.storage.download_to_file(client.settings.s3_bucket, key, handle, max_bytes=10**8)
    found = probe(str(target))
    target.unlink()
    if abs(found.duration - expected) > FRAME + 0.01:
        return [f"job {job.id}: output lasts {found.duration:.3f} s, expected {expected:.3f} s"]
    return []


# the broker, read from outside ------------------------------------------------------------
def queued_messages(url: str) -> list[dict[str, Any]]:
    """Every kombu message waiting in a Redis list, in every database: headers, properties, body."""
    client = redis.Redis.from_url(url)
    databases = [0] + [int(k[2:]) for k in client.info("keyspace") if k.startswith("db") and k != "db0"]
    messages: list[dict[str, Any]] = []
    for db in databases:
        view = redis.Redis.from_url(url.rsplit("/", 1)[0] + f"/{db}")
        for raw_key in view.scan_iter(count=1000, _type="list"):
            for raw in view.lrange(raw_key, 0, -1):
                try:
                    envelope = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(envelope, dict) and "body" in envelope and "headers" in envelope:
                    messages.append(envelope)
    return messages


def queued_job_ids(url: str, task: str) -> set[str]:
    """The job ids of the `task` messages waiting in their queue."""
    found = set()
    for envelope in queued_messages(url):
        if envelope["headers"].get("task") == task:
            args = json.loads(base64.b64decode(envelope["body"]))[0]
            found.update(str(arg) for arg in args)
    return found


# processes ------------------------------------------------------------------------------
def pool_children(pid: int) -> list[int]:
    with contextlib.suppress(psutil.NoSuchProcess):
        return [child.pid for child in psutil.Process(pid).children()]
    return []
