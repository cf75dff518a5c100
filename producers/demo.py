"""`lipsync demo`: one command from a fresh clone to lip-synced videos you can play.

Starts its own local stack (Redis, S3 server, fal emulator, one worker per queue, Flower),
makes sample media of different lengths so every sync mode shows its effect, runs the batch
with live progress, prints the table, downloads the outputs, and stops what it started.
"""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console

from config.settings import Settings, get_settings
from lipsync.models import JobStatus, SyncMode
from lipsync.samples import make_audio, make_video
from producers.devstack import local_stack

console = Console(stderr=True)

# (sync_mode, video seconds, audio seconds): the audio is longer for the modes that follow it,
# and both directions are shown for the two modes that take the shorter or the longer.
DEMO_PAIRS = [
    (SyncMode.cut_off, 4.0, 6.0),
    (SyncMode.cut_off, 6.0, 4.0),
    (SyncMode.loop, 3.0, 7.0),
    (SyncMode.bounce, 3.0, 7.0),
    (SyncMode.silence, 6.0, 4.0),
    (SyncMode.silence, 4.0, 6.0),
    (SyncMode.remap, 6.0, 4.0),
]


def run_demo(out_dir: Path, latency: str) -> int:
    from producers.api import LipsyncClient
    from producers.cli import follow, out, summary_table

    inputs = out_dir / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    console.print("[bold]making sample media[/bold]")
    media: dict[tuple[float, float], tuple[str, str]] = {}
    for _, video_s, audio_s in DEMO_PAIRS:
        media[(video_s, audio_s)] = (
            make_video(str(inputs / f"video-{video_s:g}s.mp4"), video_s),
            make_audio(str(inputs / f"speech-{audio_s:g}s.wav"), audio_s),
        )
    console.print("[bold]starting the local stack[/bold] (Redis, S3, fal emulator, workers, Flower)")
    with local_stack(Path(".lipsync") / "logs", emulator_args=("--latency", latency)) as stack:
        saved = dict(os.environ)
        os.environ.update(stack.env)
        get_settings.cache_clear()
        try:
            settings = Settings()
            client = LipsyncClient(settings)
            client.storage.ensure_bucket()
            jobs = [
                client.submit(*media[(video_s, audio_s)], sync_mode=mode.value) for mode, video_s, audio_s in DEMO_PAIRS
            ]
            console.print(f"submitted {len(jobs)} jobs; Flower: {stack.flower_url}")
            finished = follow(client, [job.id for job in jobs], timeout=600)
            out.print(summary_table(finished))
            for job in finished:
                if job.status is JobStatus.completed and job.output is not None:
                    key = job.output.url.split("/", 3)[3]
                    target = out_dir / f"{job.request.effective_sync_mode.value}-{job.id[:8]}.mp4"
                    with target.open("wb") as handle:
                        client.storage.download_to_file(
                            settings.s3_bucket, key, handle, max_bytes=settings.max_input_bytes
                        )
            console.print(f"outputs downloaded to {out_dir.resolve()}/ — play them with any video player")
            client.close()
            return 0 if all(job.status is JobStatus.completed for job in finished) else 1
        finally:
            os.environ.clear()
            os.environ.update(saved)
            get_settings.cache_clear()
