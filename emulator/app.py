"""The emulator's HTTP side: fal's queue protocol, a CDN for outputs, and an admin API.

Routes are parsed by hand (not by Starlette patterns): a submit goes to the app's full path
(`/fal-ai/sync-lipsync/v3`), while status, result and cancel live only under owner/alias
(`/fal-ai/sync-lipsync/requests/{id}`), as on fal's queue; any other path is fal's 404.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from emulator import media
from emulator.account import LOCKED_BODY, REVOKED_BODY, Accounts, account_id
from emulator.faults import Faults
from emulator.listing import ListingRefused, list_requests
from emulator.schema import InputRefused, validate
from emulator.webhooks import WebhookSigner, deliver

NGINX_BODY = (
    "<html>\r\n<head><title>{code} Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>{code}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)
# fal keeps a result 1 hour, and only 6 minutes when its JSON is 10 KB or larger: the rule is
# about the result document fal stores, not the media its URLs point to.
LARGE_RESULT_BYTES = 10 * 1024
# The apps this emulator serves (owner/alias) and the sub-paths a submit may name.
SERVED_APPS = {"fal-ai/sync-lipsync": frozenset({"v3"})}
COPY_CACHE_DIR = "_copy-cache"  # in the data dir; never a request id, never served
DOWNLOADS_AT_ONCE = 64  # input downloads in flight; fewer than httpx's 100 pooled connections
MODEL_ERRORS = [
    ("runner_disconnected", "The runner disconnected while processing the request"),
    ("request_timeout", "The request timed out while running"),
    ("internal_error", "Internal error while running the model"),
]


@dataclass
class Config:
    latency: tuple[float, float] = (0.0, 0.0)
    concurrency: int = 10  # per fal key, as fal's account limit; 0 = no limit
    media_mode: str = "encode"
    retention: float = 3600.0
    retention_large: float = 360.0
    cdn_ttl: float = 3600.0
    keys: frozenset[str] = frozenset()
    hang_seconds: float = 60.0
    # fal retries a webhook "10 times in the span of 2 hours"; tests shrink that span with a scale.
    webhook_time_scale: float = 1.0
    listing_unfinished: bool = True  # the request listing shows requests not ended yet (fal's docs are silent)

    def update(self, values: dict[str, Any]) -> None:
        for name, value in values.items():
            if name == "latency":
                self.latency = parse_latency(str(value))
            elif name == "keys":
                self.keys = frozenset(k for k in str(value).split(",") if k)
            elif name in ("concurrency",):
                self.concurrency = max(0, int(value))
            elif name == "listing_unfinished":
                self.listing_unfinished = bool(value)
            elif name == "media_mode":
                if value not in ("encode", "copy"):
                    raise ValueError("media_mode is encode or copy")
                self.media_mode = str(value)
            elif name in ("retention", "retention_large", "cdn_ttl", "hang_seconds", "webhook_time_scale"):
                setattr(self, name, float(value))
            else:
                raise ValueError(f"unknown setting {name!r}")


def input_key(arguments: Any) -> str:
    """The same input gives the same key, whatever the key order, whitespace or URL signature.

    A URL's query string is left out: a resubmitted job carries the same objects under a
    freshly presigned URL, and it is the same paid work.
    """
    canonical = json.dumps(_unsigned(arguments), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def _unsigned(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _unsigned(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unsigned(v) for v in value]
    if isinstance(value, str) and value.startswith(("http://", "https://")):
        return value.split("?", 1)[0].split("#", 1)[0]
    return value


def spoil(path: Path) -> None:
    """Replace an encoded output with bytes that are not a video: its first 32 bytes (the mp4's
    `ftyp` box, so it still looks like an mp4 by its magic), then text. No stream can be read."""
    head = path.read_bytes()[:32]
    path.write_bytes(head + b"not a video: the bytes fal's CDN served for this output\n" * 64)


def parse_latency(text: str) -> tuple[float, float]:
    low, _, high = text.partition("-")
    return (float(low), float(high or low))


@dataclass
class FalRequest:
    id: str
    app: str
    base: str
    arguments: dict[str, Any]
    marker: str | None
    webhook: str | None
    start_timeout: float | None
    account: str = ""  # account_id of the key that submitted it
    endpoint: str = ""  # the app's full path as submitted, e.g. fal-ai/sync-lipsync/v3
    headers: dict[str, str] = field(default_factory=dict)  # fal's platform headers, as received
    created: float = field(default_factory=time.time)
    status: str = "IN_QUEUE"
    logs: list[dict[str, Any]] = field(default_factory=list)
    started: float | None = None
    finished: float | None = None
    output: dict[str, Any] | None = None
    priority: str = "normal"  # X-Fal-Queue-Priority: a low request waits behind every normal one
    cdn_ttl: float | None = None  # X-Fal-Object-Lifecycle-Preference: how long the output is served
    store_io: bool = True  # X-Fal-Store-IO: 0 = fal keeps no copy of the payloads (recorded only)
    result_bytes: int = 0  # size of the JSON result document: what the retention rule measures
    error: str | None = None
    error_type: str | None = None
    error_status: int = 500
    error_body: Any = None
    timeout_type: str | None = None  # "user": X-Fal-Request-Timeout passed before a runner took it
    cancel_requested: bool = False
    inject: set[str] = field(default_factory=set)
    task: asyncio.Task[None] | None = None

    @property
    def input_key(self) -> str:
        return input_key(self.arguments)

    def urls(self) -> dict[str, str]:
        root = f"{self.base}/{self.app}/requests/{self.id}"
        return {"status_url": f"{root}/status", "response_url": root, "cancel_url": f"{root}/cancel"}

    def log(self, message: str, level: str = "INFO") -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() % 1 * 1e6):06d}"
        self.logs.append({"message": message, "level": level, "source": "user", "timestamp": stamp})


class Emulator:
    def __init__(self, config: Config, faults: Faults, data_dir: Path) -> None:
        self.config = config
        self.faults = faults
        self.data_dir = data_dir
        self.signer = WebhookSigner()
        self.requests: dict[str, FalRequest] = {}
        self.waiting = Accounts()  # every key's line; an account's concurrency, lock and counters
        self.running = 0
        self.wakeup = asyncio.Event()
        self.http: httpx.AsyncClient | None = None
        self.copy_cache = media.CopyCache(data_dir / COPY_CACHE_DIR)
        self.reset_counters()

    def reset_counters(self) -> None:
        self.counters: dict[str, Any] = {
            "submits": 0, "created": 0, "status_polls": 0, "results": 0, "cancels": 0,
            "completed": 0, "failed": 0, "webhooks": 0, "webhook_attempts": 0,
            "webhooks_ended": 0, "by_marker": {}, "by_input": {},
        }  # fmt: skip
        # Every request created since the reset, in order, and what became of those that
        # retention has swept away: fal's bill does not forget a request when its result expires.
        self.created_ids: list[str] = []
        self.swept: dict[str, dict[str, Any]] = {}

    def summary(self, found: FalRequest, swept: bool = False) -> dict[str, Any]:
        return {
            "id": found.id, "marker": found.marker, "input_key": found.input_key, "status": found.status,
            "error_type": found.error_type, "cancel_requested": found.cancel_requested,
            "inject": sorted(found.inject), "created": found.created, "started": found.started,
            "finished": found.finished, "swept": swept,
        }  # fmt: skip

    def count_created(self, found: FalRequest) -> None:
        """Count what fal would bill: every request created, by its input, whoever sent it.

        `by_input` is keyed by a digest of the input JSON, so a second request for the same
        job shows up even when the sender left out (or changed) our X-Lipsync-Job-Id header.
        """
        self.counters["created"] += 1
        self.created_ids.append(found.id)
        by_input = self.counters["by_input"]
        by_input[found.input_key] = by_input.get(found.input_key, 0) + 1
        if found.marker:
            by_marker = self.counters["by_marker"]
            by_marker[found.marker] = by_marker.get(found.marker, 0) + 1

    # lifecycle ---------------------------------------------------------------
    async def startup(self) -> None:
        self.http = httpx.AsyncClient(verify=False, timeout=httpx.Timeout(60, connect=10), follow_redirects=True)
        # Thousands of requests starting at once must not all queue inside httpx's connection
        # pool: its bookkeeping is quadratic in waiting requests and stalled the event loop.
        self.downloads = asyncio.Semaphore(DOWNLOADS_AT_ONCE)
        self._tasks = [asyncio.create_task(self._scheduler()), asyncio.create_task(self._sweeper())]

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.http is not None:
            await self.http.aclose()

    async def _scheduler(self) -> None:
        """Start waiting requests while their account has fewer than `concurrency` in progress."""
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            now = time.time()
            for request_id in list(self.waiting):
                found = self.requests.get(request_id)
                if found is None or found.status != "IN_QUEUE":
                    self.waiting.remove(request_id)
                elif found.start_timeout is not None and now - found.created > found.start_timeout:
                    self.waiting.remove(request_id)
                    self._start_timed_out(found)
            for request_id in self.waiting.next_to_start(self.config.concurrency):
                found = self.requests.get(request_id)
                if found is None or found.status != "IN_QUEUE":
                    continue
                self.running += 1
                self.waiting.started(found.account)
                found.status, found.started = "IN_PROGRESS", time.time()
                found.task = asyncio.create_task(self._run(found))
            self.waiting.note_peaks()

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            now = time.time()
            if any(r.start_timeout for r in self.requests.values() if r.status == "IN_QUEUE"):
                self.wakeup.set()
            for request_id, found in list(self.requests.items()):
                if found.finished is None:
                    continue
                if now - found.finished > self.keep_result_s(found):
                    self.swept[request_id] = self.summary(found, swept=True)
                    self.requests.pop(request_id, None)
                if now - found.finished > (found.cdn_ttl if found.cdn_ttl is not None else self.config.cdn_ttl):
                    shutil.rmtree(self.data_dir / request_id, ignore_errors=True)

    # one request's work --------------------------------------------------------
    async def _run(self, found: FalRequest) -> None:
        folder = self.data_dir / found.id
        try:
            folder.mkdir(parents=True, exist_ok=True)
            low, high = self.config.latency
            found.log("Downloading inputs")
            video = await self._download(found.arguments["video_url"], folder / "video.in", "video_url")
            audio = await self._download(found.arguments["audio_url"], folder / "audio.in", "audio_url")
            request = validate(found.arguments)
            mode = request.effective_sync_mode
            found.log(f"Running sync-3 (sync_mode={mode.value})")
            await asyncio.sleep(random.uniform(low, high))
            if found.cancel_requested:
                raise asyncio.CancelledError
            name = "output.mp4"
            duration = await asyncio.to_thread(
                media.process,
                str(video),
                str(audio),
                mode,
                str(folder / name),
                self.config.media_mode,
                self.copy_cache,
            )
            found.log(f"Encoded {duration:.2f} s of video")
            if found.inject & {"model_error", "error_on_result_only"}:
                kind, message = random.choice(MODEL_ERRORS)
                self._fail(found, kind, message, 500)
            elif "validation_after" in found.inject:
                message = "No face was detected in the video"
                detail = [{"loc": ["body", "video_url"], "msg": message, "type": "value_error"}]
                self._fail(found, "bad_input", message, 422, {"detail": detail})
            else:
                if "bad_output" in found.inject:  # fal's CDN keeps bytes that are not a video
                    spoil(folder / name)
                size = (folder / name).stat().st_size
                found.output = {
                    "video": {
                        "url": f"{found.base}/_cdn/{found.id}/{name}", "content_type": "video/mp4",
                        "file_name": name, "file_size": size,
                    }
                }  # fmt: skip
                if "wrong_file_size" in found.inject:  # fal's File says one size, the CDN serves another
                    found.output["video"]["file_size"] = size + 1
                self._finish(found)
            for leftover in ("video.in", "audio.in"):
                (folder / leftover).unlink(missing_ok=True)
        except asyncio.CancelledError:
            self._fail(found, "request_cancelled", "The request was cancelled", 400)
        except media.MediaError as exc:
            detail = [{"loc": ["body", "video_url"], "msg": str(exc), "type": "value_error"}]
            self._fail(found, "bad_input", str(exc), 422, {"detail": detail})
        except _InputError as exc:
            detail = [{"loc": ["body", exc.field], "msg": str(exc), "type": "file_download_error"}]
            self._fail(found, "bad_input", str(exc), 422, {"detail": detail})
        except Exception as exc:  # the emulator's own failure, reported as fal would
            self._fail(found, "internal_error", f"{type(exc).__name__}: {exc}", 500)
        finally:
            self.running -= 1
            self.waiting.ended(found.account)
            self.wakeup.set()

    async def _download(self, url: str, target: Path, field_name: str) -> Path:
        if url.startswith("data:"):
            header, _, payload = url.partition(",")
            try:
                body = (
                    base64.b64decode(payload, validate=True)
                    if header.endswith(";base64")
                    else urllib.parse.unquote_to_bytes(payload)
                )
            except (binascii.Error, ValueError):
                raise _InputError(field_name, f"{field_name} is not a valid data URI") from None
            target.write_bytes(body)
            return target
        assert self.http is not None
        try:
            async with self.downloads, self.http.stream("GET", url) as response:
                if response.status_code != 200:
                    raise _InputError(field_name, f"Failed to download {field_name}: HTTP {response.status_code}")
                with target.open("wb") as handle:
                    async for chunk in response.aiter_bytes(1 << 20):
                        handle.write(chunk)
        except httpx.HTTPError as exc:
            raise _InputError(field_name, f"Failed to download {field_name}: {type(exc).__name__}") from None
        return target

    def enqueue(self, found: FalRequest) -> int:
        return self.waiting.append(found.id, found.account, low=found.priority == "low")

    def _start_timed_out(self, found: FalRequest) -> None:
        """X-Fal-Request-Timeout passed before a runner took the request: fal answers 504 with
        `X-Fal-Request-Timeout-Type: user` and never runs it, so nothing is billed (fal docs,
        model-apis/inference/queue, `start_timeout`)."""
        found.timeout_type = "user"
        self.waiting.timed_out(found.account)
        body = {"detail": "Request timed out before it started", "error_type": "request_timeout"}
        self._fail(found, "request_timeout", "The request was not started before its timeout", 504, body)

    def keep_result_s(self, found: FalRequest) -> float:
        large = found.result_bytes >= LARGE_RESULT_BYTES
        return self.config.retention_large if large else self.config.retention

    def _finish(self, found: FalRequest) -> None:
        found.result_bytes = len(json.dumps(found.output).encode())
        found.status, found.finished = "COMPLETED", time.time()
        self.counters["completed"] += 1
        self._notify(found)

    def _fail(self, found: FalRequest, kind: str, message: str, status: int, body: Any = None) -> None:
        found.error, found.error_type, found.error_status = message, kind, status
        found.error_body = body if body is not None else {"detail": message}
        found.result_bytes = len(json.dumps(found.error_body).encode())
        found.status, found.finished = "COMPLETED", time.time()
        self.counters["failed"] += 1
        self._notify(found)

    def _notify(self, found: FalRequest) -> None:
        if not found.webhook or self.http is None:
            return
        payload: dict[str, Any] = {
            "request_id": found.id, "gateway_request_id": found.id,
            "status": "ERROR" if found.error else "OK",
            "payload": found.error_body if found.error else found.output,
            "error": found.error,
        }  # fmt: skip
        if "webhook_payload_error" in found.inject:
            # fal: "if there is an error serializing it, payload is set to null and a payload_error
            # will include details about the error" (docs: model-endpoints/webhooks).
            payload["payload"] = None
            payload["payload_error"] = "Payload could not be serialized as JSON"
        self.counters["webhooks"] += 1
        asyncio.create_task(self._deliver(found.webhook, payload))

    async def _deliver(self, url: str, payload: dict[str, Any]) -> None:
        assert self.http is not None
        try:
            await deliver(
                self.http, self.signer, url, payload, time_scale=self.config.webhook_time_scale,
                on_attempt=self._webhook_attempted,
            )  # fmt: skip
        finally:
            self.counters["webhooks_ended"] += 1

    def _webhook_attempted(self) -> None:
        self.counters["webhook_attempts"] += 1

    # views -----------------------------------------------------------------------
    def status_body(self, found: FalRequest, with_logs: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "status": found.status,
            "request_id": found.id,
            **found.urls(),
            "logs": found.logs if with_logs else None,
        }
        if found.status == "IN_QUEUE":
            body["queue_position"] = self.waiting.index(found.id) if found.id in self.waiting else 0
        if found.status == "COMPLETED":
            started = found.started or found.finished or 0.0
            body["metrics"] = {"inference_time": round((found.finished or 0) - started, 3)}
            # A model error may show only on the result fetch, as live fal does for some.
            if found.error and "error_on_result_only" not in found.inject:
                body["error"], body["error_type"] = found.error, found.error_type
        return body


class _InputError(Exception):
    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


# HTTP ----------------------------------------------------------------------------------
def _fal_json(
    body: Any, status: int = 200, request_id: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    extra = dict(headers or {})
    if request_id:
        extra["x-fal-request-id"] = request_id
    return JSONResponse(body, status_code=status, headers=extra)


def apply_platform_headers(found: FalRequest, headers: Any) -> None:
    """fal's platform headers as fal's docs describe them ("Platform Headers"); ValueError if malformed."""
    priority = headers.get("x-fal-queue-priority")
    if priority is not None:
        if priority not in ("normal", "low"):
            raise ValueError(f"X-Fal-Queue-Priority must be normal or low, not {priority!r}")
        found.priority = priority
    lifecycle = headers.get("x-fal-object-lifecycle-preference")
    if lifecycle is not None:
        try:
            seconds = json.loads(lifecycle)["expiration_duration_seconds"]
        except (ValueError, TypeError, KeyError):
            raise ValueError(
                'X-Fal-Object-Lifecycle-Preference must be JSON like {"expiration_duration_seconds": 3600}'
            ) from None
        found.cdn_ttl = None if seconds is None else float(seconds)
    found.store_io = headers.get("x-fal-store-io", "1") != "0"


def build_app(emulator: Emulator) -> Starlette:
    async def injected(request: Request, operation: str) -> Response | None:
        """Faults that replace an answer: rate limits, ingress and runner 5xx, hangs."""
        faults = emulator.faults
        if faults.fire("hang"):
            await asyncio.sleep(emulator.config.hang_seconds)
        if faults.fire("rate_limit"):
            return _fal_json({"detail": "Rate limit exceeded"}, 429, headers={"Retry-After": "1"})
        if faults.fire("ingress_5xx"):
            code = random.choice([502, 503, 504])
            return Response(NGINX_BODY.format(code=code), status_code=code, media_type="text/html")
        if faults.fire("runner_5xx"):
            code = 503 if operation == "submit" else 500
            return _fal_json(
                {"detail": "Runner unavailable"}, code, request_id=str(uuid.uuid4()),
                headers={"X-Fal-Error-Type": "runner_unavailable"},
            )  # fmt: skip
        return None

    def account_of(request: Request) -> str:
        return account_id(request.headers.get("authorization", "").partition(" ")[2].strip())

    def authorised(request: Request) -> Response | None:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "key" or not key.strip():
            return _fal_json({"detail": "Missing or invalid Authorization header; expected 'Key <FAL_KEY>'"}, 401)
        if emulator.config.keys and key.strip() not in emulator.config.keys:
            return _fal_json({"detail": "Invalid key"}, 401)
        if emulator.waiting.refuse_revoked(key.strip()):
            return _fal_json(REVOKED_BODY, 401)
        return None

    async def queue(request: Request) -> Response:
        parts = [p for p in request.url.path.split("/") if p]
        app_id = "/".join(parts[:2])
        if len(parts) < 2 or app_id not in SERVED_APPS:
            return _fal_json({"detail": "Not found"}, 404)
        denied = authorised(request)
        if denied is not None:
            return denied
        if parts[2:3] == ["requests"]:  # status, result and cancel: owner/alias only, never the sub-path
            tail = parts[3:]
            if not tail:
                return _fal_json({"detail": "Not found"}, 404)
            return await request_route(request, app_id, tail[0], tail[1:])
        if "/".join(parts[2:]) not in SERVED_APPS[app_id]:
            return _fal_json({"detail": "Not found"}, 404)
        if request.method != "POST":
            return _fal_json({"detail": "Method not allowed"}, 405)
        if emulator.waiting.refuse_submit(account_of(request)):
            return _fal_json(LOCKED_BODY, 403)
        return await submit(request, app_id)

    async def submit(request: Request, app_id: str) -> Response:
        emulator.counters["submits"] += 1
        failure = await injected(request, "submit")
        if failure is not None:
            return failure
        try:
            arguments = await request.json()
        except ValueError:
            return _fal_json({"detail": [{"loc": ["body"], "msg": "Invalid JSON", "type": "json_invalid"}]}, 422)
        try:
            validate(arguments)
        except InputRefused as exc:
            return _fal_json({"detail": exc.detail}, 422)
        limit = request.query_params.get("fal_max_queue_length") or request.headers.get("x-fal-queue-max-length")
        if limit and limit.isdigit() and len(emulator.waiting) >= int(limit):
            return _fal_json({"detail": "Queue is full"}, 429, headers={"Retry-After": "1"})
        # fal's docs name it X-Fal-Request-Timeout; newer fal-client sends X-Fal-Request-Start-Timeout.
        timeout = request.headers.get("x-fal-request-timeout") or request.headers.get("x-fal-request-start-timeout")
        base = f"{request.url.scheme}://{request.url.netloc}"
        found = FalRequest(
            id=str(uuid.uuid4()), app=app_id, base=base, arguments=arguments,
            marker=request.headers.get("x-lipsync-job-id"), webhook=request.query_params.get("fal_webhook"),
            start_timeout=float(timeout) if timeout else None, account=account_of(request),
            endpoint=request.url.path.strip("/"),
            headers={k: v for k, v in request.headers.items() if k.startswith("x-fal-")},
        )  # fmt: skip
        try:
            apply_platform_headers(found, request.headers)
        except ValueError as exc:
            return _fal_json({"detail": str(exc)}, 400)
        for name in ("model_error", "validation_after", "expire_result", "cdn_404", "error_on_result_only",
                     "webhook_payload_error", "wrong_file_size", "bad_output"):  # fmt: skip
            if emulator.faults.fire(name):
                found.inject.add(name)
        emulator.requests[found.id] = found
        emulator.count_created(found)
        position = emulator.enqueue(found)
        emulator.wakeup.set()
        if emulator.faults.fire("hang_answer"):
            await asyncio.sleep(emulator.config.hang_seconds)
        if emulator.faults.fire("drop_submit"):
            return _DroppedAnswer()
        if emulator.faults.fire("runner_5xx_created"):
            # Real fal can create the request and still answer 5xx; its id is in the header.
            return _fal_json(
                {"detail": "Runner unavailable"}, 503, request_id=found.id,
                headers={"X-Fal-Error-Type": "runner_unavailable"},
            )  # fmt: skip
        # fal's submit answer: the request's status and its gateway_request_id (the same id unless
        # fal retried the request on another runner) next to the URLs.
        body = {
            "status": "IN_QUEUE", "request_id": found.id, "gateway_request_id": found.id, **found.urls(),
            "queue_position": position,
        }  # fmt: skip
        return _fal_json(body, 200, request_id=found.id)

    async def request_route(request: Request, app_id: str, request_id: str, rest: list[str]) -> Response:
        found = emulator.requests.get(request_id)
        if found is not None and found.app != app_id:  # another app's request is not found here
            found = None
        if rest[:1] == ["status"]:
            emulator.counters["status_polls"] += 1
            failure = await injected(request, "status")
            if failure is not None:
                return failure
            if found is None:
                return _fal_json({"detail": "Request not found"}, 404)
            with_logs = request.query_params.get("logs", "0").lower() in ("1", "true")
            if rest[1:] == ["stream"]:
                return StreamingResponse(
                    stream(found, with_logs), media_type="text/event-stream", headers={"x-fal-request-id": found.id}
                )
            code = 200 if found.status == "COMPLETED" else 202
            return _fal_json(emulator.status_body(found, with_logs), code, request_id=found.id)
        if rest[:1] == ["cancel"]:
            if request.method != "PUT":
                return _fal_json({"detail": "Method not allowed"}, 405)
            emulator.counters["cancels"] += 1
            if found is None:
                return _fal_json({"detail": "Request not found"}, 404)
            if found.status == "COMPLETED":
                return _fal_json({"status": "ALREADY_COMPLETED"}, 400, request_id=found.id)
            found.cancel_requested = True
            if found.status == "IN_QUEUE":
                if found.id in emulator.waiting:
                    emulator.waiting.remove(found.id)
                emulator._fail(found, "request_cancelled", "The request was cancelled", 400)
            elif found.task is not None:
                found.task.cancel()
            return _fal_json({"status": "CANCELLATION_REQUESTED"}, 202, request_id=found.id)
        if rest in ([], ["response"]) and request.method == "GET":
            emulator.counters["results"] += 1
            failure = await injected(request, "result")
            if failure is not None:
                return failure
            if found is None:
                return _fal_json({"detail": "Request not found"}, 404)
            if found.status != "COMPLETED":
                return _fal_json({"detail": "Request is still in progress"}, 400, request_id=found.id)
            if "expire_result" in found.inject:  # retention ran out before the result was fetched
                return _fal_json({"detail": "Request not found"}, 404)
            if found.error:
                extra = {"X-Fal-Error-Type": found.error_type or ""}
                if found.timeout_type:
                    extra["X-Fal-Request-Timeout-Type"] = found.timeout_type
                return _fal_json(found.error_body, found.error_status, request_id=found.id, headers=extra)
            return _fal_json(found.output, 200, request_id=found.id)
        return _fal_json({"detail": "Not found"}, 404)

    async def stream(found: FalRequest, with_logs: bool) -> Any:
        last = None
        while True:
            body = emulator.status_body(found, with_logs)
            text = json.dumps(body)
            if text != last:
                yield f"data: {text}\n\n"
                last = text
            if found.status == "COMPLETED":
                return
            await asyncio.sleep(0.1)

    async def cdn(request: Request) -> Response:
        request_id, name = request.path_params["request_id"], request.path_params["name"]
        found = emulator.requests.get(request_id)
        path = emulator.data_dir / request_id / name
        hidden = request_id == COPY_CACHE_DIR or (found is not None and "cdn_404" in found.inject)
        if hidden or "/" in name or not path.is_file():
            return Response("Not Found", status_code=404)
        return FileResponse(path, media_type="video/mp4")

    async def counters(request: Request) -> Response:
        statuses = [r.status for r in emulator.requests.values()]
        return JSONResponse({
            **emulator.counters, "faults_injected": dict(emulator.faults.injected),
            "in_queue": statuses.count("IN_QUEUE"), "in_progress": statuses.count("IN_PROGRESS"),
            **emulator.waiting.counters(),
        })  # fmt: skip

    async def faults(request: Request) -> Response:
        if request.method == "DELETE":
            emulator.faults.clear()
            return JSONResponse({"faults": {}})
        try:
            for name, spec in (await request.json()).items():
                emulator.faults.set(name, spec)
        except (ValueError, AttributeError) as exc:
            return JSONResponse({"detail": str(exc)}, status_code=400)
        return JSONResponse({"faults": {k: vars(v) for k, v in emulator.faults.active.items()}})

    async def configure(request: Request) -> Response:
        try:
            emulator.config.update(await request.json())
        except (ValueError, TypeError, AttributeError) as exc:
            return JSONResponse({"detail": str(exc)}, status_code=400)
        emulator.wakeup.set()
        return JSONResponse(
            {
                "config": {
                    k: (sorted(v) if isinstance(v, frozenset) else v)
                    for k, v in vars(emulator.config).items()
                    if k != "keys"
                }
            }
        )

    async def reset(request: Request) -> Response:
        for found in emulator.requests.values():
            if found.task is not None:
                found.task.cancel()
        emulator.requests.clear()
        emulator.waiting.clear()
        emulator.faults.clear()
        emulator.faults.injected.clear()
        emulator.reset_counters()
        return JSONResponse({"reset": True})

    async def inspect(request: Request) -> Response:
        found = emulator.requests.get(request.path_params["request_id"])
        if found is None:
            return JSONResponse({"detail": "Request not found"}, status_code=404)
        state = {k: v for k, v in vars(found).items() if k not in ("task",)}
        state["inject"] = sorted(found.inject)
        state["keep_result_s"] = emulator.keep_result_s(found)
        state["input_key"] = found.input_key
        state["created_for_input"] = emulator.counters["by_input"].get(found.input_key, 0)
        return JSONResponse(state)

    async def listing(request: Request) -> Response:
        """fal's REST request listing (api.fal.ai/v1/models/requests/by-endpoint), the caller's requests."""
        denied = authorised(request)
        if denied is not None:
            return denied
        query: dict[str, list[str]] = {}
        for name, value in request.query_params.multi_items():
            query.setdefault(name, []).append(value)
        try:
            page = list_requests(
                emulator.requests.values(), account_of(request), query, time.time(),
                unfinished=emulator.config.listing_unfinished,
            )  # fmt: skip
        except ListingRefused as exc:
            return _fal_json({"detail": [{"loc": ["query"], "msg": str(exc), "type": "value_error"}]}, 422)
        return JSONResponse(page)

    async def account(request: Request) -> Response:
        """Admin: lock an account for N seconds, top it up (unlock), revoke or restore a key."""
        try:
            body = await request.json()
            action = request.path_params["action"]
            key = body.get("key")
            name = account_id(str(key)) if key else None
            if action == "lock":
                emulator.waiting.lock(float(body["seconds"]), name)
            elif action == "unlock":
                emulator.waiting.unlock(name)
            elif action == "revoke" and key:
                emulator.waiting.revoked.add(str(key))
            elif action == "restore" and key:
                emulator.waiting.revoked.discard(str(key))
            else:
                raise ValueError(f"unknown account action {action!r} (lock, unlock, revoke, restore; revoke needs key)")
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            return JSONResponse({"detail": str(exc)}, status_code=400)
        emulator.wakeup.set()
        return JSONResponse(emulator.waiting.counters())

    async def admin_requests(request: Request) -> Response:
        """Every request created since the last reset, as fal's bill would list them."""
        listed = []
        for request_id in emulator.created_ids:
            found = emulator.requests.get(request_id)
            if found is not None:
                listed.append(emulator.summary(found))
            elif request_id in emulator.swept:
                listed.append(emulator.swept[request_id])
        return JSONResponse({"requests": listed})

    async def jwks(request: Request) -> Response:
        return JSONResponse(emulator.signer.jwks())

    routes = [
        Route("/_admin/counters", counters),
        Route("/_admin/faults", faults, methods=["POST", "DELETE"]),
        Route("/_admin/config", configure, methods=["POST"]),
        Route("/_admin/reset", reset, methods=["POST"]),
        Route("/_admin/requests", admin_requests),
        Route("/_admin/requests/{request_id}", inspect),
        Route("/_admin/account/{action}", account, methods=["POST"]),
        Route("/v1/models/requests/by-endpoint", listing),
        Route("/_cdn/{request_id}/{name}", cdn),
        Route("/.well-known/jwks.json", jwks),
        Route("/{path:path}", queue, methods=["GET", "POST", "PUT"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await emulator.startup()
        try:
            yield
        finally:
            await emulator.shutdown()

    app = Starlette(routes=routes, lifespan=lifespan)
    return app


class _DropConnection(Exception):
    """Raised after an answer has started, so the server closes the connection mid-answer."""


class _DroppedAnswer(Response):
    """A submit answer lost on the wire: headers and a few bytes, then the connection closes.

    Raising after the response has started keeps Starlette from turning it into a 500: a
    lost answer must look lost, not like an error that proves nothing was created.
    """

    def __init__(self) -> None:
        super().__init__(status_code=200)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"request_id": ', "more_body": True})
        raise _DropConnection


def default_data_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="fal-emulator-"))


__all__ = ["Config", "Emulator", "build_app", "default_data_dir", "parse_latency", "os"]
