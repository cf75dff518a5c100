"""Stage: each input into the staging bucket (content-addressed), probed, validated, priced.

Everything fal would reject, or that exceeds our limits, is refused here, before any money
is spent. An input already in the pipeline's own bucket is probed but not copied: fal reads
it where it is.
"""

from __future__ import annotations

from config.settings import Settings
from lipsync.errors import InvalidInput
from lipsync.fetcher import GuardedFetcher
from lipsync.lifecycle import Advance
from lipsync.metrics import media_work
from lipsync.models import Job, JobStatus, MediaInfo, estimate_cost_usd, output_duration
from lipsync.probe import ProbeResult, probe
from lipsync.storage import Storage, parse_s3_uri
from workers.context import Context
from workers.runner import Lease
from workers.transit import HashingWriter, spool

_CONTENT_TYPES = {"video": "video/mp4", "audio": "audio/wav"}


def stage(job: Job, ctx: Context, lease: Lease) -> Advance:
    video = stage_input("video", job.request.video_url, ctx.settings, ctx.storage, ctx.fetcher, lease)
    lease.heartbeat()
    audio = stage_input("audio", job.request.audio_url, ctx.settings, ctx.storage, ctx.fetcher, lease)
    mode = job.request.effective_sync_mode
    expected = output_duration(mode, video.duration, audio.duration)
    if expected > ctx.settings.max_duration_s:
        raise InvalidInput(
            f"the output would last {expected:.1f} s with sync_mode {mode.value}, over the "
            f"limit of {ctx.settings.max_duration_s:.0f} s"
        )
    return Advance(
        JobStatus.submitting,
        fields={
            "inputs": {"video": video.model_dump(mode="json"), "audio": audio.model_dump(mode="json")},
            "expected_duration": round(expected, 3),
            "cost_estimate_usd": estimate_cost_usd(
                mode, video.duration, audio.duration, ctx.settings.price_per_output_second_usd
            ),
        },
        event=f"staged: video {video.duration:.2f}s, audio {audio.duration:.2f}s",
    )


def stage_input(
    role: str,
    source: str,
    settings: Settings,
    storage: Storage,
    fetcher: GuardedFetcher,
    lease: Lease,
) -> MediaInfo:
    in_place: str | None = None  # the key of an input already in our bucket
    with spool(settings.work_dir) as (path, fileobj):
        writer = HashingWriter(fileobj, on_write=lease.heartbeat)
        with media_work("download"):
            if source.startswith("s3://"):
                bucket, key = parse_s3_uri(source)
                storage.download_to_file(bucket, key, writer, max_bytes=settings.max_input_bytes)
                in_place = key if bucket == settings.s3_bucket else None
            elif source.startswith(("https://", "http://")):
                fetcher.fetch_to_file(source, writer)
            else:
                raise InvalidInput(
                    f"{role}_url must be an https:// or s3:// URL (local files and data: URIs are uploaded by the "
                    "producer)"
                )
        fileobj.flush()
        if writer.size == 0:
            raise InvalidInput(f"the {role} input is empty (0 bytes)")
        with media_work("probe"):
            found = probe(path, role)
        validate(role, found, settings)
        staging_key = in_place or f"{settings.staging_prefix}/{writer.sha256}"
        if in_place is None and not storage.exists(staging_key):
            with media_work("upload"):
                storage.upload_file(
                    path,
                    staging_key,
                    content_type=_CONTENT_TYPES[role],
                    metadata={"sha256": writer.sha256, "role": role},
                )
        return MediaInfo(
            staging_key=staging_key,
            sha256=writer.sha256,
            size=writer.size,
            container=found.container,
            duration=found.duration,
            video_codec=found.video_codec,
            audio_codec=found.audio_codec,
            width=found.width,
            height=found.height,
            fps=found.fps,
            num_frames=found.num_frames,
            sample_rate=found.sample_rate,
        )


def validate(role: str, found: ProbeResult, settings: Settings) -> None:
    """Refuse what the model would refuse, in words."""
    if role == "video" and not found.has_video:
        raise InvalidInput(
            f"the video input has no video stream (it is {found.container} with "
            f"{'audio only' if found.has_audio else 'no streams'}); give a video file"
        )
    if role == "audio" and not found.has_audio:
        raise InvalidInput("the audio input has no audio stream; give an audio file (wav, mp3, m4a)")
    if found.duration <= 0:
        raise InvalidInput(f"the {role} input has no duration; is it a still image?")
    if found.duration > settings.max_duration_s:
        raise InvalidInput(
            f"the {role} input lasts {found.duration:.1f} s, over the limit of {settings.max_duration_s:.0f} s"
        )
    if (
        role == "video"
        and found.width
        and found.height
        and (found.width > settings.max_width or found.height > settings.max_height)
    ):
        raise InvalidInput(
            f"the video is {found.width}x{found.height}; the largest accepted is "
            f"{settings.max_width}x{settings.max_height}"
        )
