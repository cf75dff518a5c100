"""The Python API for producers: submit, get, wait, cancel, list, retry.

A producer writes the job record and sends one message carrying the job id; everything
after that is the workers'. Errors are `lipsync.errors` exceptions with readable messages.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import redis
from kombu.exceptions import KombuError
from pydantic import ValidationError

from config.settings import Settings, get_settings
from lipsync import jobs
from lipsync.errors import InvalidInput, LipsyncError
from lipsync.fetcher import GuardedFetcher
from lipsync.models import FalPriority, Job, JobStatus, LipsyncInput, Priority
from lipsync.observe import observed_store
from lipsync.redis_client import connect
from lipsync.storage import Storage
from producers.sources import resolve_source

log = logging.getLogger("lipsync.producer")


class BrokerUnavailable(LipsyncError):
    """The job is recorded but its first message could not be sent: it starts when the broker is back.

    Its schedule entry comes due after `transfer_lease_s` and a worker's dispatcher sends it then,
    so the job runs once without a resubmit (which would pay twice).
    """

    code = "broker_unavailable"

    def __init__(self, job: Job, reason: str, retry_within_s: float) -> None:
        super().__init__(
            f"the broker is unreachable ({reason}); job {job.id} is recorded and starts by itself once the "
            f"broker is back (the schedule sends it from {retry_within_s:.0f} s after submit on): "
            "do not submit it again"
        )
        self.job = job


def request_digest(request: LipsyncInput) -> str:
    canonical = json.dumps(request.model_dump(mode="json", exclude_none=True), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


class LipsyncClient:
    """Submit and follow jobs from Python.

    Without `settings`, it uses the environment (`LIPSYNC_*`), or, when that names no services
    and `lipsync dev up` runs in the current folder, that local stack, as the CLI does.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        if settings is None:
            from producers.devenv import adopt_running_stack

            if adopt_running_stack() is not None:
                get_settings.cache_clear()
        self.settings = settings or get_settings()
        from config.broker import broker_kind

        broker_kind(self.settings.broker_url)  # a broker URL of another kind: one line, before any job exists
        self.redis = connect(self.settings.redis_url)
        self.store = observed_store(self.redis, self.settings.key_prefix)
        self._bucket_ok = False

    @cached_property
    def storage(self) -> Storage:
        return Storage(self.settings)

    def _require_bucket(self) -> None:
        """Once per client, before the first upload: a missing bucket is one line, not boto3's traceback."""
        if self._bucket_ok:
            return
        from lipsync.checks import bucket_problem

        problem = bucket_problem(self.storage)
        if problem is not None:
            raise LipsyncError(problem, code="misconfigured")
        self._bucket_ok = True

    @cached_property
    def fetcher(self) -> GuardedFetcher:
        return GuardedFetcher.from_settings(self.settings)

    @cached_property
    def _celery(self) -> Any:
        # A producer-only app built from this client's settings: the global `workers.app` is
        # configured from the process's environment, so a client given other settings (another
        # Redis) would otherwise send its messages to the wrong broker.
        from celery import Celery

        from config.celery import celery_config

        # No task-sent events from producers: Flower labels its series by the sender's node name,
        # and every producer process has its own (gen<pid>@host), so its series would grow
        # without bound. The job record keeps when each job was queued.
        config = {**celery_config(self.settings), "task_send_sent_event": False}
        return Celery("lipsync-producer", config_source=config, set_as_current=False)

    # submit ----------------------------------------------------------------
    def build_request(
        self,
        video: str,
        audio: str,
        *,
        sync_mode: str | None = None,
        options: dict[str, Any] | None = None,
        base_dir: Path | None = None,
    ) -> LipsyncInput:
        """Validate the request and turn local files and data: URIs into staged URLs."""
        fields: dict[str, Any] = {"video_url": "pending", "audio_url": "pending"}
        if sync_mode is not None:
            fields["sync_mode"] = sync_mode
        if options is not None:
            fields["options"] = options
        self._validate(fields)  # options errors first: before uploading anything
        self._require_bucket()
        for role, source in (("video", video), ("audio", audio)):
            fields[f"{role}_url"] = resolve_source(
                role,
                source,
                settings=self.settings,
                storage=self.storage,
                fetcher=self.fetcher,
                base_dir=base_dir,
            )
        return self._validate(fields)

    @staticmethod
    def _validate(fields: dict[str, Any]) -> LipsyncInput:
        try:
            return LipsyncInput.model_validate(fields)
        except ValidationError as exc:
            from lipsync.errors import describe_validation_error

            raise InvalidInput(f"invalid request: {describe_validation_error(exc)}") from None

    def submit(
        self,
        video: str,
        audio: str,
        *,
        sync_mode: str | None = None,
        options: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        metadata: dict[str, str] | None = None,
        batch_id: str | None = None,
        base_dir: Path | None = None,
        fal_priority: FalPriority | None = None,
        priority: Priority = Priority.normal,
        tenant: str | None = None,
    ) -> Job:
        """`priority` orders our admission (strictly); `tenant` shares it fairly (settings' tenant_weights)."""
        request = self.build_request(video, audio, sync_mode=sync_mode, options=options, base_dir=base_dir)
        return self.submit_request(
            request, idempotency_key=idempotency_key, metadata=metadata, batch_id=batch_id, fal_priority=fal_priority,
            priority=priority, tenant=tenant,
        )  # fmt: skip

    def submit_request(
        self,
        request: LipsyncInput,
        *,
        idempotency_key: str | None = None,
        metadata: dict[str, str] | None = None,
        batch_id: str | None = None,
        tenant: str | None = None,
        callback_url: str | None = None,
        fal_priority: FalPriority | None = None,
        priority: Priority = Priority.normal,
    ) -> Job:
        if idempotency_key is not None and not (0 < len(idempotency_key) <= 200):
            raise InvalidInput("the idempotency key must be 1 to 200 characters long")
        now = time.time()
        job = Job(
            id=self.store.new_id(),
            status=JobStatus.queued,
            request=request,
            idempotency_key=idempotency_key,
            request_digest=request_digest(request),
            batch_id=batch_id,
            metadata=metadata or {},
            tenant=tenant,
            callback_url=callback_url,
            fal_priority=fal_priority,
            priority=priority,
            created_at=now,
            updated_at=now,
            deadline_at=now + self.settings.job_deadline_s,
            timestamps={"queued": now},
        )
        job, created = self.store.create(job, dispatch_lease_s=self.settings.transfer_lease_s)
        if created:
            try:
                self._send("stage", job.id)
            except (KombuError, OSError) as exc:
                raise BrokerUnavailable(job, f"{type(exc).__name__}: {exc}", self.settings.transfer_lease_s) from None
        return job

    def _send(self, step: str, job_id: str) -> None:
        # If this message is lost, the job's schedule entry comes due and a dispatcher resends.
        jobs.celery_sender(self._celery)(step, job_id)

    # read --------------------------------------------------------------------
    def resolve_id(self, job_id_or_prefix: str) -> str:
        """The job id itself, or the one job whose id starts with this prefix (as git does)."""
        job_id = job_id_or_prefix.strip().lower()
        if self.redis.exists(self.store.job_key(job_id)) or not (4 <= len(job_id) < 32) or not job_id.isalnum():
            return job_id
        found = {
            key.decode().split(":job:", 1)[1]
            for key in self.redis.scan_iter(match=self.store.job_key(job_id) + "*", count=1000)
        }
        found = {candidate for candidate in found if ":" not in candidate}  # not the event streams
        if len(found) > 1:
            shown = ", ".join(sorted(found)[:3])
            raise InvalidInput(f"the prefix {job_id!r} matches {len(found)} jobs ({shown}…); give more of the id")
        return found.pop() if found else job_id

    def get(self, job_id: str, *, presign: bool = True) -> Job:
        job = self.store.get(job_id)
        if presign and job.output is not None and job.status is JobStatus.completed:
            key = job.output.url.split("/", 3)[3]
            job.output.presigned_url = self.storage.presign_get(key, self.settings.presign_ttl_s)
        return job

    def list(self, *, status: JobStatus | None = None, batch_id: str | None = None, limit: int = 100) -> list[Job]:
        return self.store.get_many(self.store.list_ids(status=status, batch_id=batch_id, limit=limit))

    def wait(
        self,
        job_ids: Sequence[str],
        *,
        timeout_s: float | None = None,
        interval_s: float = 0.5,
        on_progress: Callable[[dict[str, JobStatus | None]], None] | None = None,
    ) -> builtins.list[Job]:
        """Block until every job is terminal (or the timeout passes); returns the jobs."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        pending = list(dict.fromkeys(job_ids))
        while True:
            try:
                statuses = self.store.statuses(pending)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                # Redis restarting (a deploy, a crash): the jobs are safe on its disk; keep waiting.
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                log.warning("waiting for Redis to come back: %s", exc)
                time.sleep(max(interval_s, 1.0))
                continue
            if on_progress is not None:
                on_progress(statuses)
            missing = [job_id for job_id, status in statuses.items() if status is None]
            if missing:
                from lipsync.errors import JobNotFound

                raise JobNotFound(f"no job with id {missing[0]!r}")
            if all(status is not None and status.terminal for status in statuses.values()):
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            time.sleep(interval_s)
        return [self.get(job_id) for job_id in job_ids]

    def counts(self, job_ids: Iterable[str]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for status in self.store.statuses(job_ids).values():
            name = status.value if status else "missing"
            counts[name] = counts.get(name, 0) + 1
        return counts

    # change ------------------------------------------------------------------
    def cancel(self, job_id: str) -> Job:
        return jobs.cancel(self.store, self.settings, job_id)

    def retry(self, job_id: str) -> Job:
        """Start a failed or cancelled job over, from staging, with a fresh deadline."""
        return jobs.retry(self.store, self.settings, job_id, self._send)

    def close(self) -> None:
        self.redis.close()
        if "_celery" in self.__dict__:
            self._celery.close()
