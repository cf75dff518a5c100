"""`lipsync demo`: one command from a fresh clone to lip-synced videos you can play.

Starts its own local stack (Redis, S3 server, fal emulator, one worker per queue, Flower),
makes sample media of different lengths so every sync mode shows its effect, runs the batch
with live progress, prints the table, downloads the outputs, and stops what it started.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from config.settings import Settings, get_settings
from lipsync.models import Job, JobStatus, SyncMode, output_duration
from lipsync.samples import make_audio, make_video
from producers.devenv import DEFAULT_DIR, DevState
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


@contextlib.contextmanager
def demo_stack(latency: str) -> Iterator[tuple[dict[str, str], str | None]]:
    """The stack of `lipsync dev up` if it runs (left running), else a fresh one (stopped after)."""
    state = DevState.load(DEFAULT_DIR)
    if state is not None and state.processes and len(state.running) == len(state.processes):
        console.print("[bold]using the local stack of `lipsync dev up`[/bold]")
        yield state.env, state.flower_url
        return
    console.print("[bold]starting the local stack[/bold] (Redis, S3, fal emulator, workers, Flower)")
    with local_stack(Path(".lipsync") / "logs", emulator_args=("--latency", latency)) as stack:
        yield stack.env, stack.flower_url


def demo_table(jobs: Sequence[Job], files: dict[str, Path]) -> Table:
    """One row per job: the lengths in and out (and what the sync mode should give), time, cost, where."""
    table = Table(title="lipsync demo")
    for column in ("job", "sync mode", "video s", "audio s", "output s", "expected s", "status", "time s", "cost"):
        table.add_column(column, justify="right" if column.endswith((" s", "cost")) else "left")
    table.add_column("where", overflow="fold")
    for job in jobs:
        video, audio = job.inputs.get("video"), job.inputs.get("audio")
        mode = job.request.effective_sync_mode
        expected = output_duration(mode, video.duration, audio.duration) if video and audio else None
        end = job.timestamps.get(job.status.value, job.updated_at)
        colour = {"completed": "green", "failed": "red"}.get(job.status.value, "yellow")
        where = str(files[job.id]) if job.id in files else (job.error.message if job.error else "")
        table.add_row(
            job.id[:8],
            mode.value,
            f"{video.duration:.2f}" if video else "",
            f"{audio.duration:.2f}" if audio else "",
            f"{job.output.duration:.2f}" if job.output and job.output.duration else "",
            f"{expected:.2f}" if expected is not None else "",
            f"[{colour}]{job.status.value}[/{colour}]",
            f"{end - job.created_at:.1f}",
            f"${job.cost_estimate_usd:.2f}" if job.cost_estimate_usd is not None else "",
            where,
        )
    return table


def run_demo(out_dir: Path, latency: str) -> int:
    from producers.api import LipsyncClient
    from producers.cli import follow

    inputs = out_dir / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    console.print("[bold]making sample media[/bold]")
    media: dict[tuple[float, float], tuple[str, str]] = {}
    for _, video_s, audio_s in DEMO_PAIRS:
        media[(video_s, audio_s)] = (
            make_video(str(inputs / f"video-{video_s:g}s.mp4"), video_s),
            make_audio(str(inputs / f"speech-{audio_s:g}s.wav"), audio_s),
        )
    started = time.monotonic()
    with demo_stack(latency) as (env, flower_url):
        saved = dict(os.environ)
        os.environ.update(env)
        get_settings.cache_clear()
        try:
            settings = Settings()
            client = LipsyncClient(settings)
            client.storage.ensure_bucket()
            jobs = [
                client.submit(*media[(video_s, audio_s)], sync_mode=mode.value) for mode, video_s, audio_s in DEMO_PAIRS
            ]
            console.print(f"submitted {len(jobs)} jobs; Flower: {flower_url}", highlight=False)
            finished = follow(client, [job.id for job in jobs], timeout=600)
            files: dict[str, Path] = {}
            for job in finished:
                if job.status is JobStatus.completed and job.output is not None:
                    key = job.output.url.split("/", 3)[3]
                    target = out_dir / f"{job.request.effective_sync_mode.value}-{job.id[:8]}.mp4"
                    with target.open("wb") as handle:
                        client.storage.download_to_file(
                            settings.s3_bucket, key, handle, max_bytes=settings.max_input_bytes
                        )
                    files[job.id] = target
            # A log or a pipe is not a terminal: give the table room rather than 80 columns.
            table_console = Console() if Console().is_terminal else Console(width=160)
            table_console.print(demo_table(finished, files))
            spend = sum(job.cost_estimate_usd or 0.0 for job in finished if job.status is JobStatus.completed)
            console.print(
                f"{len(files)}/{len(finished)} completed in {time.monotonic() - started:.0f} s, estimated "
                f"${spend:.2f} at fal's list price; stored in s3://{settings.s3_bucket}/{settings.output_prefix}/, "
                f"downloaded to {out_dir.resolve()}/ — play them with any video player",
                highlight=False,
            )
            client.close()
            return 0 if all(job.status is JobStatus.completed for job in finished) else 1
        finally:
            os.environ.clear()
            os.environ.update(saved)
            get_settings.cache_clear()
