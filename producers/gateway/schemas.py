"""What the gateway accepts and answers, as pydantic models: they are its OpenAPI spec."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lipsync.models import FalPriority, Priority, Sync3GenerationOptions, SyncMode
from lipsync.public import PublicJob

JOB_ID_PATTERN = r"^[0-9a-f]{32}$"
MetadataValue = Annotated[str, Field(max_length=1000)]


class JobCreate(BaseModel):
    """The sync-3 input, its sources as https:// URLs or s3:// URIs, and what the platform adds."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "video_url": "s3://platform-media/clips/talk.mp4",
                    "audio_url": "s3://platform-media/dubs/talk-fr.wav",
                    "sync_mode": "cut_off",
                    "idempotency_key": "clip-1234-fr",
                    "metadata": {"clip_id": "1234"},
                }
            ]
        },
    )

    video_url: Annotated[str, Field(min_length=1, max_length=8192)]
    audio_url: Annotated[str, Field(min_length=1, max_length=8192)]
    sync_mode: SyncMode = SyncMode.cut_off
    options: Sync3GenerationOptions | None = None
    idempotency_key: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    callback_url: Annotated[str, Field(min_length=1, max_length=2048)] | None = None
    metadata: Annotated[dict[Annotated[str, Field(max_length=200)], MetadataValue], Field(max_length=50)] = Field(
        default_factory=dict
    )
    priority: Priority = Field(
        default=Priority.normal,
        description="order in the pipeline's admission to fal: high before normal before low (strict); "
        "between tenants, free slots are shared by weight. low also goes to fal as low",
    )
    fal_priority: FalPriority | None = Field(
        default=None,
        description="fal's queue priority (X-Fal-Queue-Priority): low waits behind every normal request "
        "at fal; default the pipeline's setting",
    )


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    jobs: Annotated[list[JobCreate], Field(min_length=1, max_length=1000)]


class JobPage(BaseModel):
    jobs: list[PublicJob]
    next_cursor: str | None = Field(default=None, description="pass as `cursor` for the next page; null at the end")


class JobEvent(BaseModel):
    at: float
    status: str
    previous: str
    event: str


class Batch(BaseModel):
    id: str
    created_at: float
    total: int
    counts: dict[str, int] = Field(description="number of the batch's jobs in each status")
    job_ids: list[str]


class Problem(BaseModel):
    """An error in words (`detail`) with a stable machine-readable `code`."""

    detail: str
    code: str


class ValidationProblemItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str
    input: Any | None = None
    ctx: dict[str, Any] | None = None


class ValidationProblem(BaseModel):
    """The request does not fit the schema, or a source or callback URL is refused (fal's own shape)."""

    detail: list[ValidationProblemItem]


class FalWebhookDelivery(BaseModel):
    """What fal POSTs when a request ends (documentation: the raw body is verified, then read)."""

    request_id: str
    gateway_request_id: str | None = None
    status: Literal["OK", "ERROR"]
    payload: Any | None = None
    # Set, with `payload` null, when fal could not serialize the result (docs: webhooks, "Payload
    # errors"); the result is then fetched from the queue as a poll would.
    payload_error: str | None = None
    error: str | None = None


class WebhookAck(BaseModel):
    outcome: Literal["accepted", "duplicate"]
    job_id: str


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)
