"""The sync-3 input as fal documents it, and the design's sync_mode table."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lipsync.errors import describe_validation_error
from lipsync.models import LipsyncInput, SyncMode, estimate_cost_usd, output_duration

URLS = {"video_url": "https://media.example.com/v.mp4", "audio_url": "https://media.example.com/a.wav"}


@pytest.mark.parametrize(
    ("mode", "video", "audio", "expected"),
    [
        ("cut_off", 3, 5, 3), ("cut_off", 5, 3, 3),
        ("loop", 3, 5, 5), ("loop", 5, 3, 3),
        ("bounce", 3, 5, 5), ("bounce", 5, 3, 3),
        ("silence", 3, 5, 5), ("silence", 5, 3, 5),
        ("remap", 3, 5, 5), ("remap", 5, 3, 3),
    ],
)  # fmt: skip
def test_output_length_follows_the_sync_mode_table(mode: str, video: float, audio: float, expected: float) -> None:
    assert output_duration(SyncMode(mode), video, audio) == expected


def test_cost_is_eight_dollars_per_output_minute() -> None:
    assert estimate_cost_usd(SyncMode.loop, 10, 60) == pytest.approx(8.0)
    assert estimate_cost_usd(SyncMode.cut_off, 10, 60) == pytest.approx(8 / 6, abs=1e-3)


def test_options_sync_mode_overrides_the_top_level_one() -> None:
    request = LipsyncInput.model_validate({**URLS, "sync_mode": "loop", "options": {"sync_mode": "remap"}})
    assert request.effective_sync_mode is SyncMode.remap
    assert LipsyncInput.model_validate(URLS).effective_sync_mode is SyncMode.cut_off


def test_every_documented_option_is_accepted() -> None:
    LipsyncInput.model_validate(
        {
            **URLS,
            "sync_mode": "bounce",
            "options": {
                "sync_mode": "silence", "model_mode": "talking_head", "prompt": "surprised", "temperature": 0.4,
                "occlusion_detection_enabled": True,
                "active_speaker_detection": {
                    "auto_detect": False, "v3": True, "use_v2": False, "frame_number": 12,
                    "coordinates": [100, 80], "bounding_boxes": [[1, 2, 30, 40], [3, 4, 31, 41]],
                    "bounding_boxes_url": "https://media.example.com/boxes.json",
                    "face_image": "https://media.example.com/face.png",
                },
            },
        }
    )  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"sync_mode": "stretch"}, "sync_mode"),
        ({"options": {"model_mode": "mouth"}}, "options.model_mode"),
        ({"options": {"prompt": "make it smile"}}, "options.prompt"),
        ({"options": {"temperature": "warm"}}, "options.temperature"),
        ({"options": {"temperature": "0.5"}}, "options.temperature"),
        ({"options": {"occlusion_detection_enabled": "perhaps"}}, "occlusion_detection_enabled"),
        ({"options": {"occlusion_detection_enabled": 1}}, "occlusion_detection_enabled"),
        ({"options": {"active_speaker_detection": {"frame_number": "3"}}}, "frame_number"),
        ({"options": {"active_speaker_detection": {"frame_number": 2.5}}}, "frame_number"),
        ({"options": {"active_speaker_detection": {"bounding_boxes": [[1.5, 2, 3, 4]]}}}, "bounding_boxes"),
        ({"options": {"active_speaker_detection": {"bounding_boxes": [None]}}}, "bounding_boxes"),
        ({"options": {"active_speaker_detection": {"coordinates": [1]}}}, "coordinates"),
        ({"options": {"active_speaker_detection": {"bounding_boxes": [[1, 2, 3]]}}}, "bounding_boxes"),
        ({"options": {"lipstick": True}}, "options.lipstick: is not a known field"),
        ({"colour": "red"}, "colour: is not a known field"),
        ({"options": "fast"}, "options"),
    ],
)
def test_invalid_requests_are_refused_in_words(fields: dict[str, object], words: str) -> None:
    with pytest.raises(ValidationError) as caught:
        LipsyncInput.model_validate({**URLS, **fields})
    assert words in describe_validation_error(caught.value)


def test_sync3_ignores_temperature_so_no_range_of_ours_refuses_it() -> None:
    """The page states no range (the old 0..1 was lipsync-2's); fal decides, not us."""
    for temperature in (0, 0.5, 1.5):
        LipsyncInput.model_validate({**URLS, "options": {"temperature": temperature}})


def test_the_price_is_a_setting_defaulting_to_fals_list_price() -> None:
    from config.settings import Settings

    assert Settings().price_per_output_second_usd == pytest.approx(0.1333, abs=1e-4)  # $8 a minute
    assert estimate_cost_usd(SyncMode.loop, 10, 60, price_per_second_usd=0.05) == pytest.approx(3.0)
