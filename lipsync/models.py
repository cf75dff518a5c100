"""The domain as pydantic models: the sync-3 input and output as fal documents them, and the job.

The job record round-trips through `Job`; the Redis job store keeps one JSON field per
top-level attribute so that a transition only rewrites what changed.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

# The input and output below are fal's published schema for `fal-ai/sync-lipsync/v3`, field by
# field: the model's API page (https://fal.ai/models/fal-ai/sync-lipsync/v3/api, also served as
# .../v3/llms.txt) and the `Sync3Input`, `Sync3GenerationOptions`, `Sync3ActiveSpeakerDetection`
# and `File` types of fal's JS client (fal-ai/fal-js, libs/client/src/types). A test
# (tests/unit/test_published_schema.py) walks that schema as a table and checks these models,
# so a drift is caught by a test, not by a user. Types are strict (no "3" for 3, no "yes" for
# true): fal validates what it receives, and a value it would refuse must be refused here, before
# anything is paid for. Nothing is constrained beyond the page unless a comment gives the source.


class SyncMode(StrEnum):
    """Lipsync mode when audio and video durations are out of sync (`SyncModeEnum`)."""

    cut_off = "cut_off"
    loop = "loop"
    bounce = "bounce"
    silence = "silence"
    remap = "remap"


class ModelMode(StrEnum):
    """The region the model edits (`Sync3GenerationOptions.model_mode`)."""

    lips = "lips"
    face = "face"
    head = "head"
    lipsync = "lipsync"
    emotion = "emotion"
    talking_head = "talking_head"


class EmotionPrompt(StrEnum):
    """`Sync3GenerationOptions.prompt`: an emotion, one word from the page's list, not free text."""

    happy = "happy"
    sad = "sad"
    angry = "angry"
    disgusted = "disgusted"
    surprised = "surprised"
    neutral = "neutral"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# A float field accepts a JSON integer (as JSON Schema's `number` does) but never a string.
StrictNumber = Annotated[float, Field(strict=True)]


class Sync3ActiveSpeakerDetection(_Strict):
    """Which face to lip-sync when several are on screen."""

    auto_detect: StrictBool | None = Field(default=None, description="Let the model pick the active speaker.")
    v3: StrictBool | None = Field(default=None, description="Use the v3 active speaker detection.")
    use_v2: StrictBool | None = Field(default=None, description="Use the v2 active speaker detection.")
    frame_number: StrictInt | None = Field(
        default=None, description="Frame index that the coordinates refer to."
    )  # no lower bound: the page states none
    # Two numbers because the page describes the field as `[x, y]`, a point on the speaker's face
    # (sync.so's speaker-selection guide says the same: "coordinates ([x, y])").
    coordinates: Annotated[list[StrictInt], Field(min_length=2, max_length=2)] | None = Field(
        default=None, description="[x, y] of a point on the speaker's face in frame_number."
    )
    # list<list<integer>>, one [x1, y1, x2, y2] box per frame (the page's own words, hence 4).
    # sync.so's own API also allows null for a frame without a face; fal's page does not.
    bounding_boxes: list[Annotated[list[StrictInt], Field(min_length=4, max_length=4)]] | None = Field(
        default=None, description="One [x1, y1, x2, y2] box per frame."
    )
    bounding_boxes_url: StrictStr | None = Field(default=None, description="URL of a JSON file of bounding boxes.")
    face_image: StrictStr | None = Field(default=None, description="Base64 image of the face to lip-sync.")


class Sync3GenerationOptions(_Strict):
    sync_mode: SyncMode | None = Field(default=None, description="Overrides the top-level sync_mode.")
    model_mode: ModelMode | None = None
    prompt: EmotionPrompt | None = None
    # No range: the page gives none, and sync-3 ignores temperature (sync.so's sync-3 page lists
    # it under "options not available"). The old 0..1 range was lipsync-2's, not this model's.
    temperature: StrictNumber | None = None
    occlusion_detection_enabled: StrictBool | None = None  # ignored by sync-3 (same page)
    active_speaker_detection: Sync3ActiveSpeakerDetection | None = None


class LipsyncInput(_Strict):
    """The input of `fal-ai/sync-lipsync/v3` (`Sync3Input`)."""

    video_url: Annotated[StrictStr, Field(min_length=1)] = Field(description="URL of the input video")
    audio_url: Annotated[StrictStr, Field(min_length=1)] = Field(description="URL of the input audio")
    sync_mode: SyncMode = Field(
        default=SyncMode.cut_off, description="Lipsync mode when audio and video durations are out of sync."
    )
    options: Sync3GenerationOptions | None = None

    @property
    def effective_sync_mode(self) -> SyncMode:
        """`options.sync_mode` overrides the top-level one, as the model does."""
        if self.options is not None and self.options.sync_mode is not None:
            return self.options.sync_mode
        return self.sync_mode


class File(BaseModel):
    """fal's `File`: only `url` is required; fal may add fields, which are kept."""

    model_config = ConfigDict(extra="allow")

    url: str = Field(description="The URL where the file can be downloaded from.")
    content_type: str | None = Field(default=None, description="The mime type of the file.")
    file_name: str | None = Field(default=None, description="The name of the file.")
    file_size: int | None = Field(default=None, description="The size of the file in bytes.")


class VideoFile(File):
    """fal's `VideoFile`: a File with what a probe of the video says."""

    width: int | None = None
    height: int | None = None
    fps: float | None = None
    duration: float | None = None
    num_frames: int | None = None


class LipsyncOutput(BaseModel):
    """The output of `fal-ai/sync-lipsync/v3`: `video` is a File."""

    model_config = ConfigDict(extra="allow")

    video: File


def output_duration(sync_mode: SyncMode, video_s: float, audio_s: float) -> float:
    """Length of the model's output for inputs of these lengths (the design's sync_mode table)."""
    if sync_mode is SyncMode.cut_off:
        return min(video_s, audio_s)
    if sync_mode is SyncMode.silence:
        return max(video_s, audio_s)
    return audio_s  # loop, bounce and remap all follow the audio


# fal's list price for sync-3: "$8 per minute" of output on the model's page (pricing section of
# https://fal.ai/models/fal-ai/sync-lipsync/v3/llms.txt), i.e. $0.1333 per output second. It is
# the default of the `price_per_output_second_usd` setting: prices change, code should not.
PRICE_PER_SECOND_USD = 8.0 / 60.0


def estimate_cost_usd(
    sync_mode: SyncMode, video_s: float, audio_s: float, price_per_second_usd: float = PRICE_PER_SECOND_USD
) -> float:
    return round(output_duration(sync_mode, video_s, audio_s) * price_per_second_usd, 4)


class FalPriority(StrEnum):
    """fal's queue priority (`X-Fal-Queue-Priority`, fal-client's `Priority`): normal or low."""

    normal = "normal"
    low = "low"


class Priority(StrEnum):
    """Our admission's order: strictly high before normal before low (low also goes to fal as low)."""

    high = "high"
    normal = "normal"
    low = "low"


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
    # fal's id of the request's latest try: the same as request_id unless fal retried it on
    # another runner (docs: model-endpoints/webhooks). Support tickets quote it.
    gateway_request_id: str | None = None
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
    # Sent as X-Fal-Queue-Priority; None = the `fal_queue_priority` setting.
    fal_priority: FalPriority | None = None
    priority: Priority = Priority.normal
    inputs: dict[str, MediaInfo] = Field(default_factory=dict)
    fal: FalRequest | None = None
    # What the job waits on while it cannot be submitted (a locked fal account), else None.
    waiting_on: str | None = None
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
