"""fal's webhook deliveries, received: verify, refuse and record anything not fal's, and move a
verified job on at once through the same code a poll uses (`lipsync.jobs.finish_with_result`).

Exactly once: the job store's atomic `from_` transition lets one of {poll, webhook, repeated
webhook} through; the others find the job already `storing` and change nothing. A delivery
replayed byte for byte (same signature) is refused; a genuine repeat (fal signs each attempt
afresh) is answered `duplicate` and changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from config.settings import Settings
from lipsync import jobs
from lipsync.errors import JobNotFound, LipsyncError, RetryableError
from lipsync.fal import FalQueueClient, download_failure
from lipsync.falhooks import JwksCache, WebhookRejected, verify_delivery
from lipsync.jobstore import JobStore
from lipsync.keys import Keys
from lipsync.lifecycle import step
from lipsync.models import Job, JobError, JobStatus, LipsyncOutput

log = logging.getLogger("lipsync.gateway.webhooks")


class WebhookProblem(LipsyncError):
    """Not a rejection of the sender: a state that a later delivery may find changed (404, 409, 503)."""

    def __init__(self, status: int, message: str, *, code: str) -> None:
        super().__init__(message, code=code)
        self.status = status


class FalWebhooks:
    def __init__(
        self, settings: Settings, store: JobStore, fal: FalQueueClient, jwks: JwksCache, send: jobs.Sender
    ) -> None:
        self.settings = settings
        self.store = store
        self.fal = fal
        self.jwks = jwks
        self.send = send
        self.keys = Keys(settings.key_prefix)
        self.rejected_key = self.keys.webhooks_rejected

    def handle(self, job_id: str, headers: Mapping[str, str], body: bytes, remote: str = "") -> str:
        """Returns the outcome ("accepted" or "duplicate"); raises WebhookRejected (401) or WebhookProblem."""
        try:
            delivery = verify_delivery(headers, body, self.jwks, tolerance_s=self.settings.fal_webhook_tolerance_s)
        except WebhookRejected as exc:
            self.record_rejection(job_id, exc, remote)
            raise
        except RetryableError as exc:  # fal's keys could not be fetched: fal will deliver again
            raise WebhookProblem(503, exc.message, code=exc.code) from None
        try:
            return self._apply(job_id, delivery.request_id, delivery.signature, body)
        except WebhookRejected as exc:
            self.record_rejection(job_id, exc, remote)
            raise

    def _apply(self, job_id: str, request_id: str, signature: str, body: bytes) -> str:
        store = self.store
        try:
            document = json.loads(body)
        except ValueError:
            raise WebhookRejected("the webhook body is not JSON", code="malformed") from None
        if not isinstance(document, dict) or document.get("request_id") != request_id:
            raise WebhookRejected("the webhook body does not name the signed request id", code="malformed")
        outcome = document.get("status")
        if outcome not in ("OK", "ERROR"):
            raise WebhookRejected("the webhook status is neither OK nor ERROR", code="malformed")
        seen = self.keys.webhook_seen(hashlib.sha256(signature.encode()).hexdigest())
        ttl = int(2 * self.settings.fal_webhook_tolerance_s) + 60
        if not store.redis.set(seen, job_id, nx=True, ex=ttl):
            raise WebhookRejected("this exact delivery was already received (a replay)", code="replayed")
        try:
            return self._move_job(job_id, request_id, outcome, document)
        except BaseException:
            store.redis.delete(seen)  # not handled: let fal's next attempt through
            raise

    def _move_job(self, job_id: str, request_id: str, outcome: str, document: dict[str, Any]) -> str:
        try:
            job = self.store.get(job_id)
        except JobNotFound:
            raise WebhookProblem(404, f"no job with id {job_id!r}", code="job_not_found") from None
        if job.fal is None:
            if job.status is not JobStatus.submitting:
                raise WebhookRejected("the job has no fal request", code="unknown_request")
            # A POST went out (the claim) and fal's verified delivery to this job's own URL names its
            # request: the submit's answer was lost, or is still being saved. Either way it is the job's.
            adopted = self._adopt(job, request_id) if self.store.raw_field(job_id, "submit_claimed_at") else None
            if adopted is None:
                raise WebhookProblem(409, "the job's submit is still being recorded; deliver again", code="not_ready")
            job = adopted
        if job.fal is None or job.fal.request_id != request_id:
            raise WebhookRejected("the delivery is for another fal request than this job's", code="unknown_request")
        if job.status not in step("wait").handles:
            return "duplicate"
        if outcome == "ERROR" and download_failure(document.get("payload")) is not None:
            # fal could not download the inputs: not the job's end. The poller decides, as for a poll
            # (our S3 checked, submitted again after a backoff, bounded): its check is brought forward.
            self.store.check_again(job.id, time.time())
            self.store.note(job.id, event="fal could not download the inputs (by webhook); checking the job now")
            return "accepted"
        if outcome == "ERROR":
            error = JobError(
                code="fal_error",
                message=f"fal could not process the request: {document.get('error') or 'no reason given'}"
                + _detail_text(document.get("payload")),
                fal_error_type=_error_type(document.get("payload")),
                stage="webhook",
            )
            return "accepted" if jobs.finish_with_error(self.store, job.id, error, via="webhook") else "duplicate"
        payload = document.get("payload")
        try:
            LipsyncOutput.model_validate(payload)
            result: dict[str, Any] = payload  # type: ignore[assignment]
        except ValidationError:  # fal could not serialise the payload: fetch it as a poll would
            result = self.fal.result(job.fal)
        if not jobs.finish_with_result(
            self.store, job.id, job.fal, result, via="webhook", transfer_lease_s=self.settings.transfer_lease_s
        ):
            return "duplicate"
        try:
            self.send("store", job_id)
        except Exception as exc:  # the schedule entry sends it a little later
            log.warning("job %s: could not send the store task: %s", job_id, exc)
        return "accepted"

    def _adopt(self, job: Job, request_id: str) -> Job | None:
        request = self.fal.request_urls(request_id)
        self.store.advance(
            job.id, JobStatus.submitted, from_=[JobStatus.submitting], fields={"fal": request.model_dump(mode="json")},
            event=f"adopted fal request {request_id} from its verified webhook (the submit's answer was lost)",
            due_at=time.time(),
        )  # fmt: skip
        adopted = self.store.get(job.id)
        return adopted if adopted.fal is not None and adopted.fal.request_id == request_id else None

    def record_rejection(self, job_id: str, exc: WebhookRejected, remote: str) -> None:
        log.warning("fal webhook for job %s refused (%s): %s", job_id, exc.code, exc.message)
        try:
            self.store.redis.xadd(
                self.rejected_key,
                {
                    "job_id": job_id[:64],
                    "reason": exc.code,
                    "message": exc.message,
                    "remote": remote,
                    "at": repr(time.time()),
                },
                maxlen=1000,
                approximate=True,
            )
        except Exception as record_error:  # the refusal stands even if it cannot be recorded
            log.warning("could not record a refused webhook: %s", record_error)


def _detail_text(payload: object) -> str:
    detail = payload.get("detail") if isinstance(payload, dict) else None
    if isinstance(detail, str):
        return f" ({detail[:500]})"
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        return f" ({str(detail[0].get('msg', ''))[:500]})"
    return ""


def _error_type(payload: object) -> str | None:
    if isinstance(payload, dict) and isinstance(payload.get("error_type"), str):
        return str(payload["error_type"])
    return None
