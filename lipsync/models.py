"""The domain as pydantic models: the sync-3 input and output as fal documents them, and the job.

The job record round-trips through `Job`; the Redis job store keeps one JSON field per
top-level attribute so that a transition only rewrites what changed.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

PRICE_PER_SECOND_USD = 8.0 / 60.0  # fal's list price for sync-3: about $8 per output minute


class SyncMode(StrEnum):
    cut_off = "cut_off"
    loop = "loop"
    bounce = "bounce"
    silence = "silence"
    remap = "remap"


class ModelMode(StrEnum):
    lips = "lips"
    face = "face"
    head = "head"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Sync3ActiveSpeakerDetection(_Strict):
    """Which face to lip-sync when several are on screen."""

    auto_detect: bool | None = None
    v3: bool | None = None
    use_v2: bool | None = None
    frame_number: Annotated[int, Field(ge=0)] | None = None
    coordinates: Annotated[list[int], Field(min_length=2, max_length=2)] | None = None
    bounding_boxes: list[Annotated[list[float], Field(min_length=4, max_length=4)] | None] | None = None
    bounding_boxes_url: str | None = None
    face_image: str | None = None


class Sync3GenerationOptions(_Strict):
    sync_mode: SyncMode | None = None
    model_mode: ModelMode | None = None
    prompt: Annotated[str, Field(max_length=2000)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    occlusion_detection_enabled: bool | None = None
    active_speaker_detection: Sync3ActiveSpeakerDetection | None = None


class LipsyncInput(_Strict):
    """The input of `fal-ai/sync-lipsync/v3`."""

    video_url: Annotated[str, Field(min_length=1)]
    audio_url: Annotated[str, Field(min_length=1)]
    sync_mode: SyncMode = SyncMode.cut_off
    options: Sync3GenerationOptions | None = None

    @property
    def effective_sync_mode(self) -> SyncMode:
        """`options.sync_mode` overrides the top-level one, as the model does."""
        if self.options is not None and self.options.sync_mode is not None:
            return self.options.sync_mode
        return self.sync_mode


class File(BaseModel):
    model_config = ConfigDict(extra="allow")

    url: str
    content_type: str | None = None
    file_name: str | None = None
    file_size: int | None = None


class VideoFile(File):
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    duration: float | None = None
    num_frames: int | None = None


class LipsyncOutput(BaseModel):
    model_config = ConfigDict(extra="allow")

    video: File


def output_duration(sync_mode: SyncMode, video_s: float, audio_s: float) -> float:
    """Length of the model's output for inputs of these lengths (the design's sync_mode table)."""
    if sync_mode is SyncMode.cut_off:
        return min(video_s, audio_s)
    if sync_mode is SyncMode.silence:
        return max(video_s, audio_s)
    return audio_s  # loop, bounce and remap all follow the audio


def estimate_cost_usd(sync_mode: SyncMode, video_s: float, audio_s: float) -> float:
    return round(output_duration(sync_mode, video_s, audio_s) * PRICE_PER_SECOND_USD, 4)


class JobStatus(StrEnum):
    queued = "queued"
    staging = "staging"
    submitting = "submitting"
    submitted = "submitted"
    in_queue = "in_queue"
    in_progress = "in_progress"
    storing = "storing"
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.completed, JobStatus.failed, JobStatus.cancelled})
AT_FAL_STATUSES = frozenset({JobStatus.submitted, JobStatus.in_queue, JobStatus.in_progress})


class JobError(BaseModel):
    code: str
    message: str
    retryable: bool = False
    fal_error_type: str | None = None
    stage: str | None = None


class MediaInfo(BaseModel):
    """What the probe found in one staged input."""

    staging_key: str
    sha256: str
    size: int
    container: str
    duration: float
    video_codec: str | None = None
    audio_codec: str | None = None
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    num_frames: int | None = None
    sample_rate: int | None = None


class FalLog(BaseModel):
    model_config = ConfigDict(extra="allow")

    message: str
    level: str | None = None
    source: str | None = None
    timestamp: str | None = None


class FalRequest(BaseModel):
    """The one fal request a job may have; saved the moment submit returns."""

    request_id: str
    status_url: str
    response_url: str
    cancel_url: str
    queue_position: int | None = None
    inference_time: float | None = None
    output: File | None = None  # the model's output as fal returned it, before we store it


class JobOutput(VideoFile):
    """The stored output: `url` is the s3:// URI; `presigned_url` is minted on read, never stored."""

    presigned_url: str | None = None
    fal_url: str | None = None


class Job(BaseModel):
    id: str
    status: JobStatus
    request: LipsyncInput
    idempotency_key: str | None = None
    request_digest: str
    batch_id: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    # Set by the HTTP gateway: who owns the job, and where to POST it when it ends.
    tenant: str | None = None
    callback_url: str | None = None
    inputs: dict[str, MediaInfo] = Field(default_factory=dict)
    fal: FalRequest | None = None
    logs: list[FalLog] = Field(default_factory=list)
    output: JobOutput | None = None
    error: JobError | None = None
    attempts: dict[str, int] = Field(default_factory=dict)
    cost_estimate_usd: float | None = None
    expected_duration: float | None = None
    created_at: float
    updated_at: float
    deadline_at: float
    timestamps: dict[str, float] = Field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.status.terminal

    def public_dict(self) -> dict[str, Any]:
        """The record as shown to users: fal's signed URLs are left out on purpose."""
        return self.model_dump(mode="json")
