"""The HTTP gateway (`lipsync serve`): a producer for media platforms, over HTTP.

Tenants call it with their API key; every job belongs to the tenant that made it and is
invisible to the others (404, never 403: another tenant's job id is not even confirmed).
fal calls it back on `/v1/fal/webhook/{job_id}`. The routes are plain functions run in
Starlette's thread pool, on the same synchronous clients the CLI uses.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import redis
from celery import Celery
from fastapi import Depends, FastAPI, Path, Query, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from config.celery import celery_config
from config.logging import configure_logging
from config.settings import Settings, get_settings
from lipsync.errors import (
    IdempotencyConflict,
    InvalidInput,
    InvalidTransition,
    JobNotFound,
    LipsyncError,
    RetryableError,
    UnsafeURL,
)
from lipsync.fal import FalQueueClient
from lipsync.falhooks import JwksCache, WebhookRejected
from lipsync.jobs import celery_sender
from lipsync.jobstore import JobStore
from lipsync.metrics import ObserveRequests
from lipsync.models import Job, JobStatus, LipsyncInput
from lipsync.public import PublicJob, public_job, tenant_idempotency_key
from lipsync.storage import Storage, parse_s3_uri
from lipsync.tenants import Tenant, TenantStore
from producers.api import LipsyncClient
from producers.gateway.falhook import FalWebhooks, WebhookProblem
from producers.gateway.limits import BodySizeLimit, RateLimiter
from producers.gateway.pages import InvalidCursor, decode_cursor, page_of_ids
from producers.gateway.schemas import (
    JOB_ID_PATTERN,
    Batch,
    BatchCreate,
    FalWebhookDelivery,
    Health,
    JobCreate,
    JobEvent,
    JobPage,
    Problem,
    ValidationProblem,
    WebhookAck,
)

log = logging.getLogger("lipsync.gateway")
VERSION = "1.0.0"


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


class FieldRefused(Exception):
    """A field the schema allows but the gateway refuses (an unsafe URL...): 422 in fal's shape."""

    def __init__(self, loc: list[str | int], message: str, code: str) -> None:
        super().__init__(message)
        self.loc, self.message, self.code = loc, message, code


@dataclass
class Gateway:
    """Everything the routes share, built once per gateway process."""

    settings: Settings
    client: LipsyncClient
    fal: FalQueueClient
    tenants: TenantStore
    limiter: RateLimiter
    webhooks: FalWebhooks
    readiness_storage: Storage

    @classmethod
    def build(cls, settings: Settings) -> Gateway:
        client = LipsyncClient(settings)
        fal = FalQueueClient.from_settings(settings)
        config = {**celery_config(settings), "task_send_sent_event": False}  # no Flower series per process
        celery = Celery("lipsync-gateway", config_source=config, set_as_current=False)
        jwks = JwksCache(settings.fal_jwks_url, ttl_s=settings.fal_jwks_ttl_s, timeout_s=settings.http_timeout_s)
        return cls(
            settings=settings,
            client=client,
            fal=fal,
            tenants=TenantStore(client.redis, settings.key_prefix),
            limiter=RateLimiter(client.redis, settings.key_prefix, settings.gateway_rate_limit_per_s),
            webhooks=FalWebhooks(settings, client.store, fal, jwks, celery_sender(celery)),
            readiness_storage=Storage(settings, connect_timeout_s=2, read_timeout_s=5, max_attempts=1),
        )

    @property
    def store(self) -> JobStore:
        return self.client.store

    def close(self) -> None:
        self.client.close()
        self.fal.close()


# Responses every authenticated route may give, documented so the spec tells the whole truth.
def _problem(description: str) -> dict[str, Any]:
    return {"model": Problem, "description": description}


_AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: _problem("no API key, or not an active one"),
    422: {"model": ValidationProblem, "description": "the request does not fit the schema"},
    429: _problem("over the key's rate limit; see Retry-After"),
    503: _problem("Redis or S3 is unavailable; try again"),
}
_POST_RESPONSES = {
    **_AUTH_RESPONSES,
    400: _problem("the request body could not be read"),
    413: _problem("the request body is too large"),
}
_JOB_RESPONSES = {**_AUTH_RESPONSES, 404: _problem("no such job (or not yours)")}

JobId = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="the job's id (32 hex digits)")]
bearer = HTTPBearer(auto_error=False, description="the tenant's API key (`lipsync tenants add NAME`)")


def gateway_of(request: Request) -> Gateway:
    found: Gateway = request.app.state.gateway
    return found


def authenticate(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]
) -> Tenant:
    gateway = gateway_of(request)
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise ApiError(401, "unauthorized", "send your API key as `Authorization: Bearer <key>`", challenge)
    tenant = gateway.tenants.authenticate(credentials.credentials)
    if tenant is None:
        raise ApiError(401, "unauthorized", "this API key is not valid (unknown or revoked)", challenge)
    wait = gateway.limiter.hit(tenant.key_id)
    if wait is not None:
        raise ApiError(
            429,
            "rate_limited",
            f"over the limit of {gateway.settings.gateway_rate_limit_per_s} requests per second for this key",
            {"Retry-After": str(max(1, round(wait)))},
        )
    return tenant


TenantDep = Annotated[Tenant, Depends(authenticate)]
GatewayDep = Annotated[Gateway, Depends(gateway_of)]


def create_app(settings: Settings | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings or get_settings())  # also in each process of `serve --workers N`
        gateway = Gateway.build(settings or get_settings())
        app.state.gateway = gateway
        try:
            yield
        finally:
            gateway.close()

    app = FastAPI(
        title="Lipsync gateway",
        version=VERSION,
        summary="Lip-sync video with fal-ai/sync-lipsync/v3: jobs, batches, signed callbacks.",
        lifespan=lifespan,
    )
    limit = (settings or get_settings()).gateway_max_body_bytes
    app.add_middleware(BodySizeLimit, max_bytes=limit)
    app.add_middleware(ObserveRequests)  # outermost: request counts and latency on /metrics (lipsync.metrics)
    _install_error_handlers(app)
    _add_job_routes(app)
    _add_batch_routes(app)
    _add_service_routes(app)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail, "code": exc.code}, exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own refusals (a body that is not even text, an unknown route) in our shape.
        return JSONResponse(
            {"detail": str(exc.detail), "code": f"http_{exc.status_code}"}, exc.status_code, headers=exc.headers
        )

    @app.exception_handler(FieldRefused)
    async def field_refused(_: Request, exc: FieldRefused) -> JSONResponse:
        return JSONResponse({"detail": [{"loc": exc.loc, "msg": exc.message, "type": exc.code}]}, 422)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": jsonable_encoder(exc.errors())}, 422)

    @app.exception_handler(redis.RedisError)
    async def redis_down(_: Request, exc: redis.RedisError) -> JSONResponse:
        log.warning("gateway: Redis error: %s", exc)
        return JSONResponse({"detail": "the job store is unavailable; try again", "code": "unavailable"}, 503)

    @app.exception_handler(RetryableError)
    async def transient(_: Request, exc: RetryableError) -> JSONResponse:
        return JSONResponse({"detail": exc.message, "code": exc.code}, 503)


# jobs ------------------------------------------------------------------------------------------
def _check_source(gateway: Gateway, loc: list[str | int], source: str) -> None:
    lowered = source.strip().lower()
    try:
        if lowered.startswith("s3://"):
            bucket, _ = parse_s3_uri(source)
            allowed = {b.strip() for b in gateway.settings.gateway_s3_buckets.split(",") if b.strip()}
            if bucket not in allowed or bucket == gateway.settings.s3_bucket:
                raise UnsafeURL(
                    f"the bucket {bucket!r} is not one tenants may read from"
                    + ("" if allowed else "; give an https:// URL (no buckets are open to tenants)")
                )
        elif lowered.startswith(("https://", "http://")):
            gateway.client.fetcher.check_url(source)
        else:
            raise InvalidInput("give an https:// URL or an s3:// URI")
    except InvalidInput as exc:
        raise FieldRefused(loc, exc.message, exc.code) from None


def _check_callback(gateway: Gateway, loc: list[str | int], url: str) -> None:
    if not url.lower().startswith(("https://", "http://")):
        raise FieldRefused(loc, "the callback URL must be an https:// URL", "invalid_input")
    try:
        gateway.client.fetcher.check_url(url)
    except InvalidInput as exc:
        raise FieldRefused(loc, exc.message, exc.code) from None


def _prepare(gateway: Gateway, spec: JobCreate, loc: list[str | int]) -> LipsyncInput:
    _check_source(gateway, [*loc, "video_url"], spec.video_url)
    _check_source(gateway, [*loc, "audio_url"], spec.audio_url)
    if spec.callback_url is not None:
        _check_callback(gateway, [*loc, "callback_url"], spec.callback_url)
    return LipsyncInput(
        video_url=spec.video_url, audio_url=spec.audio_url, sync_mode=spec.sync_mode, options=spec.options
    )


def _create(gateway: Gateway, tenant: Tenant, spec: JobCreate, request: LipsyncInput, batch_id: str | None) -> Job:
    conflict = ApiError(
        409,
        "idempotency_conflict",
        "this idempotency key was already used for a different request; use a new key for a new request",
    )
    try:
        job = gateway.client.submit_request(
            request,
            idempotency_key=tenant_idempotency_key(tenant.name, spec.idempotency_key) if spec.idempotency_key else None,
            metadata=spec.metadata,
            batch_id=batch_id,
            tenant=tenant.name,
            callback_url=spec.callback_url,
            fal_priority=spec.fal_priority,
            priority=spec.priority,
        )
    except IdempotencyConflict:
        raise conflict from None
    if job.tenant != tenant.name:  # a key someone chose outside the gateway: never hand over their job
        raise conflict
    return job


def _owned(gateway: Gateway, tenant: Tenant, job_id: str, *, presign: bool = False) -> Job:
    try:
        job = gateway.client.get(job_id, presign=presign)
    except JobNotFound:
        job = None
    if job is None or job.tenant != tenant.name:
        raise ApiError(404, "job_not_found", f"no job with id {job_id!r}")
    return job


def _view(gateway: Gateway, tenant: Tenant, job_id: str) -> PublicJob:
    return public_job(_owned(gateway, tenant, job_id, presign=True))


def _add_job_routes(app: FastAPI) -> None:
    @app.post(
        "/v1/jobs",
        status_code=202,
        response_model=PublicJob,
        responses={**_POST_RESPONSES, 409: _problem("the idempotency key was used for another request")},
        tags=["jobs"],
    )
    def create_job(spec: JobCreate, tenant: TenantDep, gateway: GatewayDep) -> PublicJob:
        """Submit one (video, audio) pair. The same `idempotency_key` returns the same job."""
        request = _prepare(gateway, spec, ["body"])
        return public_job(_create(gateway, tenant, spec, request, None))

    @app.get(
        "/v1/jobs", response_model=JobPage, responses={**_AUTH_RESPONSES, 404: _problem("no such batch")}, tags=["jobs"]
    )
    def list_jobs(
        tenant: TenantDep,
        gateway: GatewayDep,
        status: Annotated[JobStatus | None, Query(description="only jobs in this status")] = None,
        batch: Annotated[str | None, Query(pattern=JOB_ID_PATTERN, description="only this batch's jobs")] = None,
        cursor: Annotated[str | None, Query(max_length=200, description="`next_cursor` of the previous page")] = None,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
    ) -> JobPage:
        """The tenant's jobs, newest first, a page at a time."""
        if batch is not None:
            _owned_batch(gateway, tenant, batch)
            index = f"{gateway.settings.key_prefix}:batch:{batch}"
        else:
            index = f"{gateway.settings.key_prefix}:tenant:{tenant.name}:jobs"
        try:
            after = decode_cursor(cursor)
        except InvalidCursor as exc:
            raise FieldRefused(["query", "cursor"], exc.message, exc.code) from None
        ids, next_cursor = page_of_ids(gateway.store, index, after, limit, status)
        jobs = [j for j in gateway.store.get_many(ids) if j.tenant == tenant.name]
        return JobPage(jobs=[public_job(job) for job in jobs], next_cursor=next_cursor)

    @app.get("/v1/jobs/{job_id}", response_model=PublicJob, responses=_JOB_RESPONSES, tags=["jobs"])
    def get_job(job_id: JobId, tenant: TenantDep, gateway: GatewayDep) -> PublicJob:
        """One job; a completed job's output carries a fresh presigned download URL."""
        return _view(gateway, tenant, job_id)

    @app.get("/v1/jobs/{job_id}/events", response_model=list[JobEvent], responses=_JOB_RESPONSES, tags=["jobs"])
    def job_events(job_id: JobId, tenant: TenantDep, gateway: GatewayDep) -> list[JobEvent]:
        """What happened to the job, oldest first: transitions, retries, webhooks, callbacks."""
        _owned(gateway, tenant, job_id)
        return [
            JobEvent(
                at=float(e.get("at", 0)),
                status=e.get("status", ""),
                previous=e.get("from", ""),
                event=e.get("event", ""),
            )
            for e in gateway.store.events(job_id)
        ]

    @app.post(
        "/v1/jobs/{job_id}/cancel",
        response_model=PublicJob,
        responses={**_JOB_RESPONSES, 409: _problem("the job has already ended")},
        tags=["jobs"],
    )
    def cancel_job(job_id: JobId, tenant: TenantDep, gateway: GatewayDep) -> PublicJob:
        """Cancel a job that has not ended (and its fal request, if it has one)."""
        _owned(gateway, tenant, job_id)
        try:
            gateway.client.cancel(job_id)
        except InvalidTransition as exc:
            raise ApiError(409, exc.code, exc.message) from None
        return _view(gateway, tenant, job_id)

    @app.post(
        "/v1/jobs/{job_id}/retry",
        response_model=PublicJob,
        responses={**_JOB_RESPONSES, 409: _problem("only failed or cancelled jobs can be retried")},
        tags=["jobs"],
    )
    def retry_job(job_id: JobId, tenant: TenantDep, gateway: GatewayDep) -> PublicJob:
        """Start a failed or cancelled job over, from staging, with a fresh deadline."""
        _owned(gateway, tenant, job_id)
        try:
            gateway.client.retry(job_id)
        except InvalidTransition as exc:
            raise ApiError(409, exc.code, exc.message) from None
        return _view(gateway, tenant, job_id)


# batches ---------------------------------------------------------------------------------------
def _batch_key(gateway: Gateway, batch_id: str) -> str:
    return f"{gateway.settings.key_prefix}:gateway-batch:{batch_id}"


def _owned_batch(gateway: Gateway, tenant: Tenant, batch_id: str) -> float:
    raw = gateway.store.redis.hgetall(_batch_key(gateway, batch_id))
    if not raw or raw.get(b"tenant", b"").decode() != tenant.name:
        raise ApiError(404, "batch_not_found", f"no batch with id {batch_id!r}")
    return float(raw[b"created_at"])


def _batch_view(gateway: Gateway, batch_id: str, created_at: float) -> Batch:
    ids = [raw.decode() for raw in gateway.store.redis.zrange(f"{gateway.settings.key_prefix}:batch:{batch_id}", 0, -1)]
    counts: dict[str, int] = {}
    for status in gateway.store.statuses(ids).values():
        name = status.value if status is not None else "missing"
        counts[name] = counts.get(name, 0) + 1
    return Batch(id=batch_id, created_at=created_at, total=len(ids), counts=counts, job_ids=ids)


def _add_batch_routes(app: FastAPI) -> None:
    @app.post(
        "/v1/batches",
        status_code=202,
        response_model=Batch,
        responses={**_POST_RESPONSES, 409: _problem("an idempotency key was used for another request")},
        tags=["batches"],
    )
    def create_batch(spec: BatchCreate, tenant: TenantDep, gateway: GatewayDep) -> Batch:
        """Submit many pairs at once; every pair is checked before any job is created."""
        if len(spec.jobs) > gateway.settings.gateway_max_batch:
            raise FieldRefused(
                ["body", "jobs"], f"a batch holds at most {gateway.settings.gateway_max_batch} jobs", "too_large"
            )
        requests = [_prepare(gateway, item, ["body", "jobs", n]) for n, item in enumerate(spec.jobs)]
        batch_id = uuid.uuid4().hex
        created_at = time.time()
        gateway.store.redis.hset(
            _batch_key(gateway, batch_id), mapping={"tenant": tenant.name, "created_at": repr(created_at)}
        )
        for item, request in zip(spec.jobs, requests, strict=True):
            _create(gateway, tenant, item, request, batch_id)
        return _batch_view(gateway, batch_id, created_at)

    @app.get(
        "/v1/batches/{batch_id}",
        response_model=Batch,
        responses={**_AUTH_RESPONSES, 404: _problem("no such batch")},
        tags=["batches"],
    )
    def get_batch(
        batch_id: Annotated[str, Path(pattern=JOB_ID_PATTERN)], tenant: TenantDep, gateway: GatewayDep
    ) -> Batch:
        """The batch's jobs and how many are in each status."""
        return _batch_view(gateway, batch_id, _owned_batch(gateway, tenant, batch_id))


# fal webhooks, health --------------------------------------------------------------------------
def _add_service_routes(app: FastAPI) -> None:
    @app.post(
        "/v1/fal/webhook/{job_id}",
        response_model=WebhookAck,
        responses={
            401: _problem("not signed by fal, stale, replayed, malformed, or not this job's request"),
            404: _problem("no such job"),
            409: _problem("the job is not ready for this delivery yet; fal delivers again"),
            413: _problem("the request body is too large"),
            422: {"model": ValidationProblem, "description": "the job id is malformed"},
            503: _problem("fal's keys could not be fetched; fal delivers again"),
        },
        tags=["fal"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": FalWebhookDelivery.model_json_schema()}},
            },
            "parameters": [
                {"name": name, "in": "header", "required": True, "schema": {"type": "string"}}
                for name in (
                    "X-Fal-Webhook-Request-Id",
                    "X-Fal-Webhook-User-Id",
                    "X-Fal-Webhook-Timestamp",
                    "X-Fal-Webhook-Signature",
                )
            ],
        },
    )
    async def fal_webhook(job_id: JobId, request: Request) -> WebhookAck:
        """Where fal reports a request's end (`fal_webhook` at submit); verified with fal's JWKS."""
        gateway = gateway_of(request)
        body = await request.body()
        remote = request.client.host if request.client else ""
        try:
            outcome = await run_in_threadpool(gateway.webhooks.handle, job_id, dict(request.headers), body, remote)
        except WebhookRejected as exc:
            raise ApiError(401, exc.code, exc.message) from None
        except WebhookProblem as exc:
            raise ApiError(exc.status, exc.code, exc.message) from None
        except LipsyncError as exc:
            if isinstance(exc, RetryableError):
                raise
            raise ApiError(409, exc.code, exc.message) from None
        return WebhookAck(outcome=outcome, job_id=job_id)  # type: ignore[arg-type]

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        """Job metrics of the transitions this gateway made (jobs completed by fal webhooks)."""
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", response_model=Health, tags=["service"])
    def healthz() -> Health:
        """The process is up."""
        return Health(status="ok")

    @app.get(
        "/readyz",
        response_model=Health,
        responses={503: {"model": Health, "description": "Redis or S3 is unreachable"}},
        tags=["service"],
    )
    def readyz(gateway: GatewayDep) -> Any:
        """Redis and S3 are reachable: this gateway can take jobs."""
        checks = dict(_readiness(gateway))
        ready = all(value == "ok" for value in checks.values())
        health = Health(status="ok" if ready else "unavailable", checks=checks)
        return health if ready else JSONResponse(health.model_dump(), 503)


def _readiness(gateway: Gateway) -> Iterator[tuple[str, str]]:
    try:
        gateway.store.redis.ping()
        yield "redis", "ok"
    except redis.RedisError as exc:
        yield "redis", type(exc).__name__
    try:
        gateway.readiness_storage.client.head_bucket(Bucket=gateway.settings.s3_bucket)
        yield "s3", "ok"
    except Exception as exc:  # botocore's errors, whatever they are: not ready
        yield "s3", type(exc).__name__
