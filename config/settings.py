"""All configuration of the pipeline, in one pydantic-settings class (env prefix `LIPSYNC_`).

Defaults run against local services; secrets are `SecretStr` so they never print.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, AliasChoices, Field, SecretStr, ValidationError
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings import SettingsError as SourceError

from lipsync.errors import LipsyncError

ENV_PREFIX = "LIPSYNC_"


class ConfigError(LipsyncError):
    """A setting has a value the pipeline cannot run with; the message names the variable, the
    value and what is expected, in one line (a secret's value is never shown)."""

    code = "misconfigured"


def _broker_url(url: str) -> str:
    from config.broker import BrokerUrlError, broker_kind  # config.broker imports this module

    try:
        broker_kind(url)
    except BrokerUrlError:
        raise ValueError("expected redis://, rediss://, sentinel:// or amqp:// (RabbitMQ)") from None
    return url


def _redis_url(url: str) -> str:
    # The schemes `lipsync.sentinel.redis_from_url` connects to.
    if urlsplit(url.strip()).scheme.lower() not in ("redis", "rediss", "unix", "sentinel"):
        raise ValueError("expected redis://, rediss://, unix:// or sentinel://")
    return url


Seconds = Annotated[float, Field(gt=0)]
SecondsOrZero = Annotated[float, Field(ge=0)]  # where 0 means off, none or at once
Count = Annotated[int, Field(gt=0)]
CountOrZero = Annotated[int, Field(ge=0)]
Rate = Annotated[float, Field(gt=0)]
Price = Annotated[float, Field(ge=0)]
Port = Annotated[int, Field(ge=0, le=65535)]  # 0 = off
BrokerUrl = Annotated[str, AfterValidator(_broker_url)]
RedisUrl = Annotated[str, AfterValidator(_redis_url)]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    def __init__(self, **values: Any) -> None:
        # Every way in (CLI, worker, Python API, tests) gets one line naming the variable, not
        # pydantic's multi-line report.
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(describe_settings_errors(exc.errors())) from None
        except SourceError as exc:  # a JSON-valued variable that is not JSON
            raise ConfigError(_describe_source_error(exc)) from None
        if self.poll_initial_s > self.poll_max_s:  # the backoff's cap would hide its start
            raise ConfigError(
                f"{env_name('poll_initial_s')}={_shown('poll_initial_s', f'{self.poll_initial_s:g}')} is not valid: "
                f"expected at most {env_name('poll_max_s')} ({self.poll_max_s:g}), the backoff's cap; "
                "raise both when fal webhooks are on"
            )

    # fal: FAL_KEY is the fal ecosystem's own variable, so it carries no prefix.
    fal_key: SecretStr = Field(default=SecretStr(""), validation_alias=AliasChoices("FAL_KEY", "LIPSYNC_FAL_KEY"))
    fal_queue_url: str = "https://queue.fal.run"
    fal_app: str = "fal-ai/sync-lipsync/v3"
    # The gateway's webhook URL, e.g. https://lipsync.example.com/v1/fal/webhook (each job gets
    # "/<job id>" appended); empty = poll only. Polling stays on either way, as the safety net.
    fal_webhook_url: str = ""
    # fal's webhook signing keys (JWKS), how long they are cached, and the accepted clock skew.
    fal_jwks_url: str = "https://rest.alpha.fal.ai/.well-known/jwks.json"
    fal_jwks_ttl_s: SecondsOrZero = 3600.0
    fal_webhook_tolerance_s: Seconds = 300.0

    broker_url: BrokerUrl = "redis://localhost:6379/0"
    redis_url: RedisUrl = "redis://localhost:6379/0"
    key_prefix: str = "lipsync"

    s3_endpoint_url: str = ""
    s3_bucket: str = "lipsync"
    s3_region: str = "us-east-1"
    staging_prefix: str = "staging"
    output_prefix: str = "outputs"
    upload_prefix: str = "uploads"

    # Hosts the guarded fetcher may reach although they resolve to private addresses.
    allow_private_urls: str = ""
    # Fixed answers for host names, "host=ip,host=ip" (as curl's --resolve): split-horizon DNS,
    # and the hostile-input tests' public-looking names. The fetcher still checks each address.
    resolve_overrides: str = ""

    # Limits.
    max_input_bytes: Count = 2 * 1024**3
    max_duration_s: Seconds = 30 * 60.0
    max_width: Count = 4096
    max_height: Count = 4096
    fetch_timeout_s: Seconds = 300.0
    job_deadline_s: Seconds = 2 * 3600.0
    presign_ttl_s: Count = 6 * 3600
    max_in_flight: Count = 10_000
    submits_per_second: Rate = 20.0
    # Adaptive admission (lipsync/lua/admit.lua): jobs kept at fal = the account's concurrency (the
    # hint below, raised to the most requests seen IN_PROGRESS at once while none waited IN_QUEUE)
    # + this buffer, which covers a submit's round trip; `max_in_flight` stays the ceiling. 0 = off.
    fal_queue_buffer: CountOrZero = 4
    # The concurrency assumed before any has been observed (fal plans run 2-40 at once): set it to
    # your plan's, so a cold start fills the account at once.
    fal_concurrency_hint: Count = 10
    # Weighted-fair admission across tenants: a tenant's share of free slots is its weight over the
    # weights of the tenants with jobs waiting (a tenant not named weighs 1). JSON, e.g.
    # LIPSYNC_TENANT_WEIGHTS='{"acme": 3, "globex": 1}'. Priorities (high/normal/low) come first.
    tenant_weights: dict[str, float] = Field(default_factory=dict)
    # A job refused for a full cap waits with us this long before it asks again (a safety net): a
    # slot freed when a job leaves fal is handed at once to the next job in the fair queue (the
    # poller's dispatch), so waiting jobs do not spin a submit task each second.
    admission_recheck_s: Seconds = 300.0
    # An idle tenant coming back may be this many slots behind the least active tenant (its next
    # jobs go first until it has caught up), so a small tenant behind a big batch is not held to
    # every other slot. Unset: twice `fal_concurrency_hint`.
    tenant_credit_slots: Annotated[float, Field(ge=0)] | None = None
    # A running request is not cancelled by the job's deadline (it is being paid for already),
    # only by an explicit cancel or by this generous bound on its time at fal.
    max_run_s: Seconds = 6 * 3600.0
    # A locked account (403 "User is locked") or refused key (401): submits pause, and one probe
    # submit is let through after this interval, doubling up to the max while fal still refuses.
    fal_account_probe_s: Seconds = 5.0
    fal_account_probe_max_s: Seconds = 60.0
    # fal's REST API, for its request listing (GET /v1/models/requests/by-endpoint), which finds
    # the request of a submit whose answer was lost. Empty: https://api.fal.ai with fal's own queue,
    # else the queue URL's host (the emulator serves the listing there).
    fal_api_url: str = ""
    # A request not in the listing counts as absent only once its start timeout has passed (fal
    # may list only ended requests) plus this margin; then the job is submitted again.
    fal_listing_grace_s: SecondsOrZero = 10.0
    # Whether fal's listing shows requests not ended yet. fal's docs do not say, so with fal's own API
    # (None = auto) absence is confirmed only after the start timeout; the emulator lists them (its
    # default), so there "not listed" after `fal_listing_grace_s` is absent.
    fal_listing_lists_unfinished: bool | None = None

    # Polling: exponential backoff with jitter, claimed under a short lease.
    poll_initial_s: Seconds = 1.0
    poll_max_s: Seconds = 30.0
    poll_lease_s: Seconds = 60.0
    # A transfer task may wait in a busy queue; its dispatch lease covers that wait.
    transfer_lease_s: Seconds = 300.0
    heartbeat_s: SecondsOrZero = 10.0
    dispatch_interval_s: Seconds = 0.25
    dispatch_batch: Count = 500

    # Retries of transient errors, per stage.
    max_retries: CountOrZero = 8
    retry_base_s: SecondsOrZero = 1.0
    retry_max_s: SecondsOrZero = 60.0

    # Worker.
    transfer_concurrency: Count = 16  # threads: transfers wait on S3 and HTTP, not on the CPU
    api_concurrency: Count = 8
    http_timeout_s: Seconds = 30.0
    run_dispatcher: bool = True
    work_dir: str = ""  # temp files for media in transit; empty = the system's temp dir

    # The HTTP gateway (`lipsync serve`): body cap, per-key rate limit, batch size.
    gateway_max_body_bytes: Count = 1024 * 1024
    gateway_rate_limit_per_s: CountOrZero = 20  # 0 = no limit
    gateway_max_batch: Count = 500
    # Buckets tenants may name as s3:// sources (comma-separated). They are read with the
    # pipeline's own credentials, so the default is none: tenants give https URLs.
    gateway_s3_buckets: str = ""

    # Callbacks to tenants when a job ends: signed, retried with backoff, then given up.
    callback_max_attempts: Count = 8
    callback_retry_base_s: SecondsOrZero = 2.0
    callback_retry_max_s: SecondsOrZero = 300.0
    callback_timeout_s: Seconds = 10.0

    # Prometheus /metrics from each worker's main process (0 = off). Prefork children share values
    # through files in metrics_dir (empty: a per-port dir under the system's temp dir, wiped at start).
    metrics_port: Port = 9808
    metrics_address: str = "127.0.0.1"
    metrics_dir: str = ""

    # Flower's basic auth, "user:password"; Flower refuses to start without it.
    flower_basic_auth: SecretStr = SecretStr("")
    # Celery task events (received, started, succeeded: what Flower's task pages show) from the
    # moment a worker starts. Off, a running Flower turns them on itself within 5 s of a worker
    # starting; with nobody watching they cost a Redis PUBLISH and CPU for every task.
    task_events: bool = False

    # Logs: one line per event; JSON for log shippers.
    log_json: bool = False
    log_level: str = "INFO"

    # fal's platform headers, sent with every submit (lipsync/fal.py says what each costs or saves).
    # Queue priority for jobs that name none: "normal" or "low" (fal-client's _headers.py
    # `Priority`); unset sends no header (fal's default, normal).
    fal_queue_priority: Literal["normal", "low"] | None = None
    # X-Fal-Request-Timeout: seconds a request may wait at fal before a runner starts it; fal then
    # answers 504 and nothing is billed. Every submit sends the job's time left to its deadline,
    # at most this many seconds (0: no bound but the deadline).
    fal_start_timeout_s: SecondsOrZero = 0.0
    # X-Fal-Store-IO: 0 by default. Otherwise fal keeps each request's JSON payloads for 30 days,
    # and ours carry presigned URLs of the inputs (credentials for as long as they are valid).
    fal_store_io: bool = False
    # X-Fal-Object-Lifecycle-Preference: how long fal keeps its CDN copy of the output. We copy it
    # to S3 within minutes, so a day is plenty; 0 sends none (fal's default retention applies).
    fal_output_lifecycle_s: CountOrZero = 24 * 3600
    # A second queue host tried only when the first cannot be connected to (nothing reached fal,
    # so a second POST cannot pay twice). Empty = none: fal's documentation names no such host.
    fal_fallback_queue_url: str = ""

    # fal's list price for sync-3 per second of output ($8 a minute on the model's page).
    price_per_output_second_usd: Price = 8.0 / 60.0
    # Redis with Sentinel: redis_url and broker_url may be sentinel://h1:26379;sentinel://h2:26379
    # ?master_name=NAME (lipsync.sentinel). The money-critical writes (submit claim, fal request id)
    # then wait for this many replicas to acknowledge them (Redis WAIT), at most redis_ack_timeout_ms;
    # 0 = off, right for a single Redis. No acknowledgement in time: "refuse" (nothing is sent to fal,
    # the step is retried) or "single_host" (logged once, go on with AOF on the master alone).
    redis_min_replicas_ack: int = Field(default=0, ge=0)
    redis_ack_timeout_ms: int = Field(default=1000, gt=0)
    redis_ack_policy: Literal["refuse", "single_host"] = "refuse"

    # fal input download failures: fal answered `file_download_error` (it could not fetch a presigned
    # input from our S3; the model never ran). The job is submitted again with fresh URLs after a
    # backoff (first wait, doubling to the cap), at most this many times, while its deadline leaves time.
    fal_download_resubmits: int = Field(default=3, ge=0)
    fal_download_backoff_s: float = Field(default=2.0, gt=0)
    fal_download_backoff_max_s: float = Field(default=30.0, gt=0)

    def allowed_private_hosts(self) -> frozenset[str]:
        return frozenset(host.strip().lower() for host in self.allow_private_urls.split(",") if host.strip())

    def resolved_hosts(self) -> dict[str, str]:
        pairs = (entry.partition("=") for entry in self.resolve_overrides.split(",") if "=" in entry)
        return {host.strip().lower(): address.strip() for host, _, address in pairs if host.strip()}


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings from its environment; `ConfigError` (one line) for a bad value."""
    return Settings()


def env_name(field: str) -> str:
    """The environment variable a field is read from."""
    info = Settings.model_fields.get(field)
    if info is not None and isinstance(info.validation_alias, AliasChoices):
        first = info.validation_alias.choices[0]
        if isinstance(first, str):
            return first
    return f"{ENV_PREFIX}{field.upper()}"


def _field_of(name: str) -> str:
    """The field an error's location names: pydantic names an aliased field by the alias it tried."""
    for field, info in Settings.model_fields.items():
        aliases = info.validation_alias.choices if isinstance(info.validation_alias, AliasChoices) else []
        if name.lower() in (str(alias).lower() for alias in aliases):
            return field
    return name


_EXPECTED = {
    "int_parsing": "a whole number",
    "int_type": "a whole number",
    "int_from_float": "a whole number",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "true or false (also 1/0, yes/no, on/off)",
    "bool_type": "true or false (also 1/0, yes/no, on/off)",
    "dict_type": 'a JSON object, e.g. {"acme": 3}',
}


def _expected(error: ErrorDetails) -> str:
    context = error.get("ctx") or {}
    kind = error["type"]
    if kind in _EXPECTED:
        return _EXPECTED[kind]
    if kind == "greater_than":
        return f"a number greater than {context['gt']:g}"
    if kind == "greater_than_equal":
        return f"a number of at least {context['ge']:g}"
    if kind == "less_than_equal":
        return f"a number of at most {context['le']:g}"
    if kind == "value_error":
        return str(context.get("error", error["msg"])).removeprefix("expected ")
    # pydantic's own words otherwise ("Input should be 'normal' or 'low'").
    return re.sub(r"^Input should be ", "", error["msg"])


def _shown(field: str, value: object) -> str:
    if getattr(Settings.model_fields.get(field), "annotation", None) is SecretStr:
        return "(hidden)"
    text = value if isinstance(value, str) else repr(value)
    # A URL's password is not for a terminal or a log.
    text = re.sub(r"(://[^:/@\s]*:)[^@/\s]*@", r"\1***@", text)
    return repr(text)


def describe_settings_errors(errors: list[ErrorDetails]) -> str:
    """One line for all of pydantic's errors: `VAR='value' is not valid: expected ...`, per variable."""
    parts: dict[str, str] = {}
    for error in errors:
        field = _field_of(str(error["loc"][0]) if error["loc"] else "?")
        # A union (`bool | None`) reports each branch; the first branch says what is meant.
        if field in parts or error["type"] == "none_required":
            continue
        parts[field] = f"{env_name(field)}={_shown(field, error['input'])} is not valid: expected {_expected(error)}"
    return "; ".join(parts.values())


def _describe_source_error(exc: SourceError) -> str:
    import os

    found = re.search(r'field "(\w+)"', str(exc))
    if found is None:
        return f"the settings could not be read: {exc}"
    field = found.group(1)
    name = env_name(field)
    value = next((v for k, v in os.environ.items() if k.upper() == name), "")
    return f"{name}={_shown(field, value)} is not valid: expected JSON"
