"""A small client for fal's queue API: submit, status, result, cancel.

The protocol facts live here and nowhere else. The one decision that matters for money is
made in `submit`: an error that proves no request was created is retryable; anything that
may have created one (the answer was lost) is `SubmitOutcomeUnknown`, never re-POSTed.
"""

from __future__ import annotations

import email.utils
import json
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import httpx
from pydantic import SecretStr

from config.settings import Settings
from lipsync.errors import FalError, InputDownloadFailed, InvalidInput, PermanentError, RetryableError
from lipsync.models import FalLog, FalPriority, FalRequest

# Statuses that say "try again" without anything having happened (RETRY_CODES in fal-client).
_RETRY_STATUS = frozenset({408, 409, 429})
_INGRESS_STATUS = frozenset({502, 503, 504})
MARKER_HEADER = "X-Lipsync-Job-Id"
# fal's REST API (Platform APIs): its request listing finds the request of a lost submit answer.
FAL_API_URL = "https://api.fal.ai"

# fal's platform headers (fal-client's projects/fal_client/src/fal_client/_headers.py for names and
# values; fal docs "Platform Headers", documentation/model-apis/common-parameters, and "Data
# Retention & Storage", documentation/model-apis/media-expiration, for what each does).
# Queue priority, "normal" or "low": a low request waits behind every normal one on the endpoint's
# queue, which all of fal's users share. It costs waiting time; fal lists no price difference.
QUEUE_PRIORITY_HEADER = "X-Fal-Queue-Priority"
# Seconds a request may wait for a runner to start it (queue, runner acquisition, retries). Past
# it fal answers 504 with X-Fal-Request-Timeout-Type: user and nothing ran, so nothing is billed;
# it never limits the run itself. fal's docs name this header; fal-client's newest _headers.py
# sends X-Fal-Request-Start-Timeout for the same SDK argument (start_timeout): the docs win here.
REQUEST_TIMEOUT_HEADER = "X-Fal-Request-Timeout"
# On the result of a request fal dropped for it: "user" (it never started; not billed).
START_TIMEOUT_TYPE_HEADER = "X-Fal-Request-Timeout-Type"
# "0": fal does not keep the request's JSON payloads (kept 30 days otherwise, for the dashboard's
# history). Ours hold presigned URLs of the tenant's media, credentials until they expire.
STORE_IO_HEADER = "X-Fal-Store-IO"
# How long fal keeps the output on its CDN, as {"expiration_duration_seconds": N}. We copy the
# video to our own bucket within minutes, so fal's copy need not outlive the day.
OBJECT_LIFECYCLE_HEADER = "X-Fal-Object-Lifecycle-Preference"
# fal's model error type for an input URL it could not fetch (fal docs "Model Errors",
# documentation/model-apis/errors): the body is {"detail": [{"loc": ["body", field], "msg", "type"}]},
# `type` the machine-readable category to branch on, `msg` for a person. The model never ran.
FILE_DOWNLOAD_ERROR = "file_download_error"


@dataclass(frozen=True)
class FalHeaders:
    """The platform headers every submit carries, from settings; a job may override priority/timeout."""

    queue_priority: FalPriority | None = None
    start_timeout_s: float | None = None
    store_io: bool = False
    output_lifecycle_s: int | None = None

    def render(self, *, priority: FalPriority | None = None, start_timeout_s: float | None = None) -> dict[str, str]:
        headers: dict[str, str] = {}
        chosen_priority = priority or self.queue_priority
        if chosen_priority is not None:
            headers[QUEUE_PRIORITY_HEADER] = chosen_priority.value
        timeout = start_timeout_s if start_timeout_s is not None else self.start_timeout_s
        if timeout:
            headers[REQUEST_TIMEOUT_HEADER] = f"{timeout:g}"
        if not self.store_io:
            headers[STORE_IO_HEADER] = "0"
        if self.output_lifecycle_s:
            headers[OBJECT_LIFECYCLE_HEADER] = json.dumps({"expiration_duration_seconds": self.output_lifecycle_s})
        return headers


class SubmitOutcomeUnknown(PermanentError):
    """The submit was sent but its answer was lost: fal may or may not have created a request.

    `request_id` is fal's, when its answer carried one (a 5xx with `x-fal-request-id`)."""

    code = "submit_outcome_unknown"

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


class AccountRefused(RetryableError):
    """fal refuses the account, not the job: 403 "User is locked" (exhausted balance) or 401 (the key
    is unknown or revoked). Nothing was created; every submit would be refused alike until a top-up
    or a key change, so the account's breaker opens (lipsync/account.py) instead of failing jobs."""


class QueueState(StrEnum):
    in_queue = "IN_QUEUE"
    in_progress = "IN_PROGRESS"
    completed = "COMPLETED"


@dataclass(frozen=True)
class QueueStatus:
    state: QueueState
    queue_position: int | None = None
    logs: list[FalLog] = field(default_factory=list)
    inference_time: float | None = None
    error: str | None = None
    error_type: str | None = None


class CancelOutcome(StrEnum):
    requested = "CANCELLATION_REQUESTED"
    already_completed = "ALREADY_COMPLETED"
    not_found = "NOT_FOUND"


def retry_after_seconds(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value)
        return max(0.0, parsed.timestamp() - time.time())


def is_ingress_error(response: httpx.Response) -> bool:
    """A 502/503/504 from fal's ingress (nginx), before any fal service saw the request."""
    return (
        response.status_code in _INGRESS_STATUS
        and "x-fal-request-id" not in response.headers
        and "nginx" in response.text.lower()
    )


def download_failure(body: object, fallback: str | None = None) -> InputDownloadFailed | None:
    """A fal model-error body that says an input could not be downloaded, as `InputDownloadFailed`
    naming the input (`loc`) and fal's words (`msg`); None for any other body. `fallback`: fal's
    error text to use when the body does not say which input (a status whose error_type said so)."""
    detail = body.get("detail") if isinstance(body, dict) else None
    for item in detail if isinstance(detail, list) else []:
        if isinstance(item, dict) and item.get("type") == FILE_DOWNLOAD_ERROR:
            field = ".".join(str(part) for part in item.get("loc") or [] if part != "body") or "an input"
            return _download_failed(field, str(item.get("msg") or "no reason given")[:500])
    if fallback is not None:
        return _download_failed("an input", fallback[:500])
    return None


def _download_failed(input_name: str, fal_message: str) -> InputDownloadFailed:
    return InputDownloadFailed(
        f"fal could not download the inputs ({input_name}: {fal_message})",
        input_name=input_name,
        fal_message=fal_message,
    )


def _json(response: httpx.Response) -> object:
    try:
        body: object = response.json()
    except ValueError:
        return None
    return body


def _detail(response: httpx.Response) -> str:
    """fal's error body in words: `detail` may be a string or a list of validation errors."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", []) if p != "body")
                parts.append(f"{loc}: {item.get('msg', item)}" if loc else str(item.get("msg")))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return str(detail)


def auth_headers(key: SecretStr) -> dict[str, str]:
    """fal's API key scheme: `Authorization: Key <key>`."""
    return {"Authorization": f"Key {key.get_secret_value()}"}


def http_timeout(seconds: float) -> httpx.Timeout:
    """Every call to fal: `seconds` in all, at most 10 s of it to connect."""
    return httpx.Timeout(seconds, connect=min(10.0, seconds))


class FalQueueClient:
    def __init__(
        self,
        *,
        queue_url: str,
        app: str,
        key: SecretStr,
        timeout_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        platform_headers: FalHeaders | None = None,
        fallback_queue_url: str = "",
    ) -> None:
        self.queue_url = queue_url.rstrip("/")
        self.app = app.strip("/")
        self._key = key
        self.platform_headers = platform_headers or FalHeaders()
        # Tried only when the first host cannot be connected to: then nothing reached fal, and a
        # second POST cannot create a second request. fal's answer URLs are followed from there on.
        self.fallback_queue_url = fallback_queue_url.rstrip("/")
        self._http = httpx.Client(
            timeout=http_timeout(timeout_s),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
            transport=transport,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> FalQueueClient:
        return cls(
            queue_url=settings.fal_queue_url,
            app=settings.fal_app,
            key=settings.fal_key,
            timeout_s=settings.http_timeout_s,
            platform_headers=FalHeaders(
                queue_priority=FalPriority(settings.fal_queue_priority) if settings.fal_queue_priority else None,
                start_timeout_s=settings.fal_start_timeout_s or None,
                store_io=settings.fal_store_io,
                output_lifecycle_s=settings.fal_output_lifecycle_s or None,
            ),
            fallback_queue_url=settings.fal_fallback_queue_url,
        )

    def close(self) -> None:
        self._http.close()

    def _headers(self) -> dict[str, str]:
        return auth_headers(self._key)

    # submit ----------------------------------------------------------------
    def submit(
        self,
        arguments: dict[str, Any],
        *,
        marker: str,
        webhook_url: str | None = None,
        priority: FalPriority | None = None,
        start_timeout_s: float | None = None,
    ) -> FalRequest:
        params = {"fal_webhook": webhook_url} if webhook_url else None
        headers = {
            **self._headers(),
            **self.platform_headers.render(priority=priority, start_timeout_s=start_timeout_s),
            MARKER_HEADER: marker,
        }
        hosts = [self.queue_url, *([self.fallback_queue_url] if self.fallback_queue_url else [])]
        try:
            for number, host in enumerate(hosts, start=1):
                try:
                    response = self._http.post(f"{host}/{self.app}", json=arguments, params=params, headers=headers)
                    break
                except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                    if number == len(hosts):  # nothing reached fal: safe to try again later
                        raise RetryableError(f"could not connect to fal: {type(exc).__name__}") from None
        except httpx.TransportError as exc:
            raise SubmitOutcomeUnknown(
                "the submit reached fal but its answer was lost "
                f"({type(exc).__name__}); fal may have created a request, so it was not sent "
                "again to avoid paying twice. Check fal's dashboard, then `lipsync retry` "
                "the job to submit it anew."
            ) from None
        if 200 <= response.status_code < 300:  # any 2xx: fal made the request
            body = response.json()
            return FalRequest(
                gateway_request_id=body.get("gateway_request_id"),
                request_id=body["request_id"],
                status_url=body["status_url"],
                response_url=body["response_url"],
                cancel_url=body["cancel_url"],
                queue_position=body.get("queue_position"),
            )
        request_id = response.headers.get("x-fal-request-id")
        if response.status_code >= 500 and request_id and not is_ingress_error(response):
            # fal's own services saw it and named a request: it may exist. Reconcile, never re-POST blind.
            raise SubmitOutcomeUnknown(
                f"fal answered {response.status_code} on submit with request id {request_id}; "
                "fal may have created the request, so it is looked up before anything is sent again",
                request_id=request_id,
            )
        raise self._error(response, "submit")

    def request_urls(self, request_id: str) -> FalRequest:
        """A request known only by its id (found in fal's listing): its URLs use owner/alias only."""
        owner_alias = "/".join(self.app.split("/")[:2])
        base = f"{self.queue_url}/{owner_alias}/requests/{request_id}"
        return FalRequest(
            request_id=request_id, status_url=f"{base}/status", response_url=base, cancel_url=f"{base}/cancel"
        )

    @staticmethod
    def listing_url(settings: Settings) -> str:
        """Where fal's request listing is: the setting; else fal's REST API for fal's own queue, else the
        queue's host (the emulator), so a local stack never asks the real fal."""
        if settings.fal_api_url:
            return settings.fal_api_url.rstrip("/")
        queue = httpx.URL(settings.fal_queue_url)
        if queue.host == "queue.fal.run":
            return FAL_API_URL
        return f"{queue.scheme}://{queue.netloc.decode()}"

    @staticmethod
    def listing_lists_unfinished(settings: Settings) -> bool:
        if settings.fal_listing_lists_unfinished is not None:
            return settings.fal_listing_lists_unfinished
        return FalQueueClient.listing_url(settings) != FAL_API_URL

    def list_requests(self, api_url: str, *, since: float, request_id: str | None = None) -> list[dict[str, Any]]:
        """fal's request listing (`GET /v1/models/requests/by-endpoint`, with inputs), newest first,
        for requests sent since `since`; every page. Raises RetryableError when it cannot be read."""
        params: dict[str, str] = {
            "endpoint_id": self.app,
            "expand": "payloads",
            "limit": "100",
            "start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since - 60)),
        }
        if request_id:
            params["request_id"] = request_id
        items: list[dict[str, Any]] = []
        for _ in range(100):  # bounded: a cursor that never ends cannot hold a worker
            response = self._get(f"{api_url.rstrip('/')}/v1/models/requests/by-endpoint", params=params)
            if response.status_code != 200:
                raise self._error(response, "request listing")
            body = response.json()
            items.extend(body.get("items") or [])
            cursor = body.get("next_cursor")
            if not body.get("has_more") or not cursor:
                break
            params["cursor"] = str(cursor)
        return items

    # status / result / cancel --------------------------------------------------
    def status(self, request: FalRequest, *, with_logs: bool = True) -> QueueStatus:
        return read_status(self._get(request.status_url, params={"logs": "1" if with_logs else "0"}))

    def result(self, request: FalRequest) -> dict[str, Any]:
        response = self._get(request.response_url)
        if response.status_code == 200:
            body: dict[str, Any] = response.json()
            return body
        if response.status_code == 400 and "in progress" in _detail(response).lower():
            raise RetryableError("fal says the result is not ready yet", delay=1.0)
        raise self._error(response, "result")

    def cancel(self, request: FalRequest) -> CancelOutcome:
        try:
            response = self._http.put(request.cancel_url, headers=self._headers())
        except httpx.TransportError as exc:
            raise RetryableError(f"could not reach fal to cancel: {type(exc).__name__}") from None
        if response.status_code == 202:
            return CancelOutcome.requested
        if response.status_code == 400:
            return CancelOutcome.already_completed
        if response.status_code == 404:
            return CancelOutcome.not_found
        raise self._error(response, "cancel")

    def _get(self, url: str, params: dict[str, str] | None = None) -> httpx.Response:
        try:
            return self._http.get(url, params=params, headers=self._headers())
        except httpx.TransportError as exc:
            # Reads are idempotent: any transport failure is worth another try.
            raise RetryableError(f"could not reach fal: {type(exc).__name__}") from None

    # errors ----------------------------------------------------------------
    @staticmethod
    def _error(response: httpx.Response, operation: str) -> Exception:
        status = response.status_code
        if status == 429 or status in _RETRY_STATUS:
            return RetryableError(
                f"fal asked to slow down ({status}) on {operation}",
                code="fal_rate_limited",
                delay=retry_after_seconds(response),
            )
        if is_ingress_error(response):
            return RetryableError(
                f"fal's ingress answered {status} on {operation}; nothing reached fal",
                code="fal_unavailable",
                delay=retry_after_seconds(response),
            )
        if status >= 500:
            error_type = response.headers.get("x-fal-error-type")
            return RetryableError(
                f"fal answered {status} on {operation}"
                + (f" ({error_type})" if error_type else "")
                + f": {_detail(response)}",
                code="fal_server_error",
                delay=retry_after_seconds(response),
            )
        if status == 401 or (status == 403 and "locked" in _detail(response).lower()):
            return AccountRefused(
                f"fal refuses the account ({status}) on {operation}: {_detail(response)}",
                code="fal_account_locked" if status == 403 else "fal_key_refused",
                delay=retry_after_seconds(response),
            )
        if status == 403:
            return PermanentError(
                f"fal refused the key ({status}) on {operation}; check FAL_KEY",
                code="fal_unauthorized",
            )
        failed_download = download_failure(_json(response))
        if failed_download is not None:  # not the input's fault: fal could not fetch it (our S3 away)
            return failed_download
        if status == 422:
            return InvalidInput(f"fal rejected the input: {_detail(response)}", code="fal_validation_error")
        if status == 404:
            return FalError(
                f"fal does not know this request any more ({operation} answered 404); its result may have expired",
                code="fal_request_gone",
            )
        return FalError(
            f"fal answered {status} on {operation}: {_detail(response)}",
            error_type=response.headers.get("x-fal-error-type"),
        )


def read_status(response: httpx.Response) -> QueueStatus:
    """fal's answer to a status request (202 while queued or running, 200 when COMPLETED); the
    poller reads its own asynchronous responses with it too."""
    if response.status_code not in (200, 202):
        raise FalQueueClient._error(response, "status")
    body = response.json()
    metrics = body.get("metrics") or {}
    return QueueStatus(
        state=QueueState(body["status"]),
        queue_position=body.get("queue_position"),
        logs=[FalLog.model_validate(entry) for entry in body.get("logs") or []],
        inference_time=metrics.get("inference_time"),
        error=body.get("error"),
        error_type=body.get("error_type"),
    )
