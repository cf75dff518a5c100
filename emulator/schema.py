"""The emulator's own copy of sync-3's published input schema, and fal's 422 for what breaks it.

Written from fal's page for `fal-ai/sync-lipsync/v3` (https://fal.ai/models/fal-ai/sync-lipsync/v3/api;
the same fields as `Sync3Input`, `Sync3GenerationOptions` and `Sync3ActiveSpeakerDetection` in fal's
JS client), deliberately NOT imported from `lipsync/`: when the pipeline's models drift from the
page, the emulator refuses as fal would and the pipeline's tests see it. Only what the page states
is checked; nothing of ours is added.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError


class SyncMode(StrEnum):
    cut_off = "cut_off"
    loop = "loop"
    bounce = "bounce"
    silence = "silence"
    remap = "remap"


def output_duration(mode: SyncMode, video_s: float, audio_s: float) -> float:
    """How long the model's output is, per the page's description of each sync_mode."""
    if mode is SyncMode.cut_off:
        return min(video_s, audio_s)
    if mode is SyncMode.silence:
        return max(video_s, audio_s)
    return audio_s  # loop, bounce and remap stretch the video to the audio


class ModelMode(StrEnum):
    lips = "lips"
    face = "face"
    head = "head"
    lipsync = "lipsync"
    emotion = "emotion"
    talking_head = "talking_head"


class Emotion(StrEnum):
    happy = "happy"
    sad = "sad"
    angry = "angry"
    disgusted = "disgusted"
    surprised = "surprised"
    neutral = "neutral"


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")  # fal's apps refuse unknown fields with 422


class ActiveSpeakerDetection(_Input):
    auto_detect: StrictBool | None = None
    v3: StrictBool | None = None
    use_v2: StrictBool | None = None
    frame_number: StrictInt | None = None
    coordinates: Annotated[list[StrictInt], Field(min_length=2, max_length=2)] | None = None  # "[x, y]"
    bounding_boxes: list[Annotated[list[StrictInt], Field(min_length=4, max_length=4)]] | None = None
    bounding_boxes_url: StrictStr | None = None
    face_image: StrictStr | None = None


class GenerationOptions(_Input):
    sync_mode: SyncMode | None = None
    model_mode: ModelMode | None = None
    prompt: Emotion | None = None
    temperature: Annotated[float, Field(strict=True)] | None = None
    occlusion_detection_enabled: StrictBool | None = None
    active_speaker_detection: ActiveSpeakerDetection | None = None


class Sync3Input(_Input):
    video_url: StrictStr
    audio_url: StrictStr
    sync_mode: SyncMode = SyncMode.cut_off
    options: GenerationOptions | None = None

    @property
    def effective_sync_mode(self) -> SyncMode:
        if self.options is not None and self.options.sync_mode is not None:
            return self.options.sync_mode
        return self.sync_mode


class InputRefused(Exception):
    """The input breaks the published schema; `detail` is fal's 422 body's `detail` list."""

    def __init__(self, detail: list[dict[str, Any]]) -> None:
        super().__init__(detail[0]["msg"] if detail else "invalid input")
        self.detail = detail


def validate(arguments: Any) -> Sync3Input:
    """The input as fal's app reads it, or `InputRefused` with fal's 422 detail."""
    try:
        return Sync3Input.model_validate(arguments)
    except ValidationError as exc:
        raise InputRefused(
            [
                {
                    "loc": ["body", *[str(part) if isinstance(part, str) else part for part in error["loc"]]],
                    "msg": error["msg"],
                    "type": error["type"],
                    "input": error.get("input"),
                }
                for error in exc.errors(include_url=False)
            ]
        ) from None
