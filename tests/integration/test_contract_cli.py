"""The sync-3 contract through the `lipsync` command line, against the strict emulator and real workers.

Every enum value fal publishes for `fal-ai/sync-lipsync/v3` is accepted and reaches fal unchanged
(the emulator records the arguments each request arrived with); every value outside the published
schema is refused on the user's machine, before a request is created at fal: exit 2, one line, no
traceback. The emulator validates with its own copy of the page, so a model of ours that let a
wrong value through would fail the job there, and a model that refused a published value would
fail here.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from emulator.control import EmulatorProcess
from tests.fixtures.cli import lipsync

pytestmark = pytest.mark.usefixtures("workers")

SYNC_MODES = ["cut_off", "loop", "bounce", "silence", "remap"]
MODEL_MODES = ["lips", "face", "head", "lipsync", "emotion", "talking_head"]
EMOTIONS = ["happy", "sad", "angry", "disgusted", "surprised", "neutral"]


def published_requests() -> list[tuple[str, dict[str, Any]]]:
    """Six requests that between them use every published enum value, and every speaker field once."""
    requests = []
    for n in range(6):
        options: dict[str, Any] = {
            "sync_mode": SYNC_MODES[(n + 2) % 5],
            "model_mode": MODEL_MODES[n],
            "prompt": EMOTIONS[n],
        }
        if n == 0:
            options |= {
                "temperature": 0.5,
                "occlusion_detection_enabled": True,
                "active_speaker_detection": {
                    "auto_detect": False, "v3": True, "use_v2": False, "frame_number": 0,
                    "coordinates": [10, 12], "bounding_boxes": [[0, 0, 32, 32], [1, 1, 33, 33]],
                    "bounding_boxes_url": "https://media.example.com/boxes.json", "face_image": "aGVsbG8=",
                },
            }  # fmt: skip
        requests.append((SYNC_MODES[n % 5], options))
    return requests


def test_every_published_value_is_accepted_and_reaches_fal_unchanged(
    stack_env: dict[str, str], media: dict[str, str], emulator: EmulatorProcess
) -> None:
    sent = published_requests()
    covered = {
        "sync_mode": {mode for mode, _ in sent},
        "options.sync_mode": {options["sync_mode"] for _, options in sent},
        "model_mode": {options["model_mode"] for _, options in sent},
        "prompt": {options["prompt"] for _, options in sent},
    }
    assert covered == {"sync_mode": set(SYNC_MODES), "options.sync_mode": set(SYNC_MODES),
                       "model_mode": set(MODEL_MODES), "prompt": set(EMOTIONS)}  # fmt: skip
    job_ids = []
    for n, (sync_mode, options) in enumerate(sent):
        submitted = lipsync(
            stack_env, "submit", "--video", media["video_3s"], "--audio", media["audio_3s"],
            "--sync-mode", sync_mode, "--options", json.dumps(options), *(["--low-priority"] if n == 1 else []),
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stderr
        job_ids.append(submitted.stdout.strip())
    waited = lipsync(stack_env, "wait", *job_ids, "--json", "--timeout", "150")
    assert waited.returncode == 0, waited.stdout + waited.stderr
    records = {record["id"]: record for record in map(json.loads, waited.stdout.splitlines())}
    for n, (job_id, (sync_mode, options)) in enumerate(zip(job_ids, sent, strict=True)):
        record = records[job_id]
        assert record["status"] == "completed", record["error"]
        at_fal = emulator.inspect(record["fal"]["request_id"])
        assert at_fal["arguments"]["sync_mode"] == sync_mode
        assert at_fal["arguments"]["options"] == options, "fal received exactly what the user gave"
        # fal's platform headers: per job (priority) and by setting (payloads not kept, output kept a day)
        assert at_fal["priority"] == ("low" if n == 1 else "normal")
        assert at_fal["store_io"] is False and at_fal["cdn_ttl"] == 24 * 3600
        assert record["fal_priority"] == ("low" if n == 1 else None)
        assert record["cost_estimate_usd"] == pytest.approx(3 * 8 / 60, abs=0.01)

    shown = lipsync(stack_env, "status", job_ids[0])
    assert shown.returncode == 0 and "estimated cost" in shown.stdout and "$0.4" in shown.stdout
    table = lipsync(stack_env, "wait", *job_ids, "--timeout", "30")
    assert "estimated cost $2.4" in table.stdout and "6 of 6 jobs priced" in table.stdout


OUTSIDE = [
    (["--sync-mode", "stretch"], "sync_mode"),
    (["--options", '{"model_mode": "mouth"}'], "options.model_mode"),
    (["--options", '{"prompt": "make it smile"}'], "options.prompt"),
    (["--options", '{"prompt": "Happy"}'], "options.prompt"),
    (["--options", '{"sync_mode": "freeze"}'], "options.sync_mode"),
    (["--options", '{"temperature": "warm"}'], "options.temperature"),
    (["--options", '{"occlusion_detection_enabled": "yes"}'], "occlusion_detection_enabled"),
    (["--options", '{"active_speaker_detection": {"bounding_boxes": [[0.5, 0, 10, 10]]}}'], "bounding_boxes"),
    (["--options", '{"active_speaker_detection": {"bounding_boxes": [null]}}'], "bounding_boxes"),
    (["--options", '{"active_speaker_detection": {"frame_number": "7"}}'], "frame_number"),
    (["--options", '{"active_speaker_detection": {"coordinates": [1.5, 2]}}'], "coordinates"),
    (["--options", '{"seed": 42}'], "options.seed"),
]


def test_every_value_outside_the_published_schema_is_refused_before_any_money_is_spent(
    stack_env: dict[str, str], media: dict[str, str], emulator: EmulatorProcess, client: Any
) -> None:
    run = uuid.uuid4().hex[:8]
    keys = {f"contract-refused-{run}-{n}" for n in range(len(OUTSIDE))}
    before = set(emulator.counters()["by_marker"])
    for n, (extra, field) in enumerate(OUTSIDE):
        refused = lipsync(
            stack_env, "submit", "--video", media["video_3s"], "--audio", media["audio_3s"],
            "--idempotency-key", f"contract-refused-{run}-{n}", *extra,
        )  # fmt: skip
        assert refused.returncode == 2, (extra, refused.stdout, refused.stderr)
        lines = [line for line in refused.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, (extra, refused.stderr)
        assert "Traceback" not in refused.stderr and field in lines[0], (extra, lines[0])
        assert not refused.stdout.strip(), "no job id: nothing was created"
    # Every fal request is marked with its job's id. Requests other tests' jobs made meanwhile
    # may appear; none may be one of ours.
    for job_id in set(emulator.counters()["by_marker"]) - before:
        assert client.get(job_id, presign=False).idempotency_key not in keys, "a refused request reached fal"
