"""Our models and the emulator's schema against fal's published schema for sync-3, field by field.

The table below is the page (https://fal.ai/models/fal-ai/sync-lipsync/v3/api and its llms.txt;
the `Sync3Input`, `Sync3GenerationOptions`, `Sync3ActiveSpeakerDetection` and `File` types of
fal's JS client) written out by hand. Both `lipsync.models` and `emulator.schema` are read back
through their JSON Schema and compared with it: a field renamed, a type changed, an enum value
added or lost, a field made required, and this test says which one.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from emulator import schema as emulator_schema
from lipsync import models

SYNC_MODES = ["cut_off", "loop", "bounce", "silence", "remap"]
MODEL_MODES = ["lips", "face", "head", "lipsync", "emotion", "talking_head"]
EMOTIONS = ["happy", "sad", "angry", "disgusted", "surprised", "neutral"]

# type notation: "string" | "integer" | "number" | "boolean" | ["enum", values] | ["object", name]
#                | ["array", item type]
Field = tuple[Any, bool, Any]  # (type, required, default)
PUBLISHED: dict[str, dict[str, Field]] = {
    "Sync3Input": {
        "video_url": ("string", True, None),
        "audio_url": ("string", True, None),
        "sync_mode": (["enum", SYNC_MODES], False, "cut_off"),
        "options": (["object", "Sync3GenerationOptions"], False, None),
    },
    "Sync3GenerationOptions": {
        "sync_mode": (["enum", SYNC_MODES], False, None),
        "model_mode": (["enum", MODEL_MODES], False, None),
        "prompt": (["enum", EMOTIONS], False, None),
        "temperature": ("number", False, None),
        "occlusion_detection_enabled": ("boolean", False, None),
        "active_speaker_detection": (["object", "Sync3ActiveSpeakerDetection"], False, None),
    },
    "Sync3ActiveSpeakerDetection": {
        "auto_detect": ("boolean", False, None),
        "v3": ("boolean", False, None),
        "use_v2": ("boolean", False, None),
        "frame_number": ("integer", False, None),
        "coordinates": (["array", "integer"], False, None),
        "bounding_boxes": (["array", ["array", "integer"]], False, None),
        "bounding_boxes_url": ("string", False, None),
        "face_image": ("string", False, None),
    },
    "File": {
        "url": ("string", True, None),
        "content_type": ("string", False, None),
        "file_name": ("string", False, None),
        "file_size": ("integer", False, None),
    },
    "VideoFile": {
        "url": ("string", True, None),
        "content_type": ("string", False, None),
        "file_name": ("string", False, None),
        "file_size": ("integer", False, None),
        "width": ("integer", False, None),
        "height": ("integer", False, None),
        "fps": ("number", False, None),
        "duration": ("number", False, None),
        "num_frames": ("integer", False, None),
    },
    "Output": {"video": (["object", "File"], True, None)},
}

OURS: dict[str, type[BaseModel]] = {
    "Sync3Input": models.LipsyncInput,
    "Sync3GenerationOptions": models.Sync3GenerationOptions,
    "Sync3ActiveSpeakerDetection": models.Sync3ActiveSpeakerDetection,
    "File": models.File,
    "VideoFile": models.VideoFile,
    "Output": models.LipsyncOutput,
}
EMULATOR: dict[str, type[BaseModel]] = {
    "Sync3Input": emulator_schema.Sync3Input,
    "Sync3GenerationOptions": emulator_schema.GenerationOptions,
    "Sync3ActiveSpeakerDetection": emulator_schema.ActiveSpeakerDetection,
}
# Our names for fal's types, so that ["object", fal name] can be followed to our model.
FAL_NAME = {
    model.__name__: fal_name for table in (OURS, EMULATOR) for fal_name, model in table.items() if fal_name != "Output"
}


def shape(prop: dict[str, Any], defs: dict[str, Any]) -> Any:
    """A JSON Schema property in the table's notation; `X | None` reads as X (the field is optional)."""
    if "anyOf" in prop:
        kinds = [option for option in prop["anyOf"] if option.get("type") != "null"]
        assert len(kinds) == 1, f"a union the page does not have: {prop}"
        return shape(kinds[0], defs)
    if "$ref" in prop:
        name = prop["$ref"].rsplit("/", 1)[-1]
        target = defs[name]
        if "enum" in target:
            return ["enum", list(target["enum"])]
        return ["object", FAL_NAME.get(name, name)]
    if "enum" in prop:
        return ["enum", list(prop["enum"])]
    if prop.get("type") == "array":
        return ["array", shape(prop["items"], defs)]
    return prop["type"]


def read_back(model: type[BaseModel]) -> dict[str, Field]:
    document = model.model_json_schema()
    defs = document.get("$defs", {})
    required = set(document.get("required", []))
    return {
        name: (shape(prop, defs), name in required, prop.get("default"))
        for name, prop in document["properties"].items()
    }


@pytest.mark.parametrize("fal_type", list(OURS))
def test_our_models_match_the_published_schema(fal_type: str) -> None:
    assert read_back(OURS[fal_type]) == PUBLISHED[fal_type]


@pytest.mark.parametrize("fal_type", list(EMULATOR))
def test_the_emulators_schema_matches_the_published_schema(fal_type: str) -> None:
    assert read_back(EMULATOR[fal_type]) == PUBLISHED[fal_type]


def test_a_drift_is_caught_by_name() -> None:
    """The comparison itself fails on a lost enum value, a changed type and a new required field."""

    class Drifted(BaseModel):
        sync_mode: str = "cut_off"
        video_url: str
        audio_url: str
        options: models.Sync3GenerationOptions | None = None
        seed: int

    assert read_back(Drifted) != PUBLISHED["Sync3Input"]
    drifted = read_back(Drifted)
    assert drifted["sync_mode"][0] == "string" and drifted["seed"][1] is True


URLS = {"video_url": "https://media.example.com/v.mp4", "audio_url": "https://media.example.com/a.wav"}


def every_published_value() -> list[dict[str, Any]]:
    inputs: list[dict[str, Any]] = [{**URLS, "sync_mode": mode} for mode in SYNC_MODES]
    inputs += [{**URLS, "options": {"sync_mode": mode}} for mode in SYNC_MODES]
    inputs += [{**URLS, "options": {"model_mode": mode}} for mode in MODEL_MODES]
    inputs += [{**URLS, "options": {"prompt": emotion}} for emotion in EMOTIONS]
    return inputs


OUTSIDE = [
    {"sync_mode": "stretch"},
    {"options": {"model_mode": "mouth"}},
    {"options": {"prompt": "make it smile"}},
    {"options": {"prompt": "Happy"}},
    {"options": {"temperature": "warm"}},
    {"options": {"active_speaker_detection": {"bounding_boxes": [[0.5, 1, 2, 3]]}}},
    {"options": {"active_speaker_detection": {"bounding_boxes": [None]}}},
    {"options": {"active_speaker_detection": {"frame_number": "7"}}},
    {"options": {"active_speaker_detection": {"auto_detect": "yes"}}},
    {"options": {"seed": 3}},
]


@pytest.mark.parametrize("arguments", every_published_value(), ids=lambda a: str(a.get("options", a.get("sync_mode"))))
def test_every_published_value_passes_both_and_is_sent_unchanged(arguments: dict[str, Any]) -> None:
    ours = models.LipsyncInput.model_validate(arguments)
    sent = ours.model_dump(mode="json", exclude_none=True)
    assert {k: v for k, v in sent.items() if k in arguments} == arguments
    emulator_schema.validate(sent)


@pytest.mark.parametrize("fields", OUTSIDE, ids=str)
def test_every_value_outside_the_schema_is_refused_by_both(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        models.LipsyncInput.model_validate({**URLS, **fields})
    with pytest.raises(emulator_schema.InputRefused) as refused:
        emulator_schema.validate({**URLS, **fields})
    assert refused.value.detail[0]["loc"][0] == "body"
