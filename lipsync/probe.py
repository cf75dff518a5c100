"""The media probe (PyAV): container, codecs, duration, frame rate and size of one file.

It reads headers and packets, never decodes frames, so probing a long video stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import av

from lipsync.errors import InvalidInput


@dataclass(frozen=True)
class ProbeResult:
    container: str
    duration: float
    video_codec: str | None = None
    audio_codec: str | None = None
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    num_frames: int | None = None
    sample_rate: int | None = None

    @property
    def has_video(self) -> bool:
        return self.video_codec is not None

    @property
    def has_audio(self) -> bool:
        return self.audio_codec is not None


# Containers whose header names every stream with its parameters: for these the header says all
# there is (FFmpeg's default reads up to 5 MB of packets after it: a WAV's probe cost grew with the
# file, about 2 ms per 64 KB). The quick probe reads FFmpeg's least (32 bytes of packets: a WAV's
# probe 1.1 -> 0.3 ms, an MP4's unchanged); anything else, or anything it leaves incomplete, is
# probed in full.
_HEADER_COMPLETE = frozenset({"mp4", "mov", "wav"})
_QUICK = {"probesize": "32"}


def probe(path: str, role: str | None = None) -> ProbeResult:
    """What the media is; `role` ("video", "audio") names the input in the error, if any."""
    subject = f"the {role} input" if role else "the file"
    try:
        with av.open(path, metadata_errors="ignore", container_options=_QUICK) as container:
            quick = _probe(container)
        if _complete(quick):
            return quick
    except (av.FFmpegError, InvalidInput):
        pass  # the full probe below decides, and says why in words
    try:
        with av.open(path, metadata_errors="ignore") as container:
            return _probe(container)
    except av.FFmpegError as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise InvalidInput(f"{subject} is not a readable audio or video file ({reason})") from None
    except InvalidInput as exc:
        raise InvalidInput(exc.message.replace("the file", subject, 1)) from None


def _complete(found: ProbeResult) -> bool:
    if found.container not in _HEADER_COMPLETE or found.duration <= 0:
        return False
    video_ok = found.video_codec is None or bool(found.width and found.height and found.fps)
    audio_ok = found.audio_codec is None or bool(found.sample_rate)
    return video_ok and audio_ok


def _probe(container: av.container.InputContainer) -> ProbeResult:
    video = next((s for s in container.streams.video if s.codec_context is not None), None)
    audio = next((s for s in container.streams.audio), None)
    if video is not None and video.codec_context.name in ("png", "mjpeg", "bmp", "gif") and (video.frames <= 1):
        video = None  # a still image (or cover art) is not a video
    if video is None and audio is None:
        raise InvalidInput("the file is not a readable audio or video file (no audio or video stream)")
    name = container.format.name.split(",")[0]
    if name == "mov" and (container.format.name or "").find("mp4") >= 0:
        name = "mp4"
    video_duration, frames = _stream_length(container, video) if video else (0.0, None)
    audio_duration, _ = _stream_length(container, audio) if audio else (0.0, None)
    duration = max(video_duration, audio_duration)
    if duration <= 0 and container.duration:
        duration = container.duration / av.time_base
    fps = None
    if video is not None:
        rate = video.average_rate or video.guessed_rate or video.base_rate
        fps = float(rate) if rate else None
    return ProbeResult(
        container=name,
        duration=round(duration, 4),
        video_codec=video.codec_context.name if video else None,
        audio_codec=audio.codec_context.name if audio else None,
        width=video.codec_context.width if video else None,
        height=video.codec_context.height if video else None,
        fps=round(fps, 3) if fps else None,
        num_frames=frames,
        sample_rate=audio.codec_context.sample_rate if audio else None,
    )


def _stream_length(container: av.container.InputContainer, stream: av.stream.Stream) -> tuple[float, int | None]:
    """(seconds, frames) from the stream header, or by walking the packets when it has none."""
    base = stream.time_base or Fraction(1, 1)
    if stream.duration and stream.duration > 0:
        seconds = float(stream.duration * base)
        frames = stream.frames or None
        if stream.type == "video" and not frames and stream.average_rate:
            frames = round(seconds * float(stream.average_rate))
        return seconds, frames
    end, count = 0.0, 0
    container.seek(0)
    for packet in container.demux(stream):
        if packet.pts is None or packet.size == 0:
            continue
        count += 1
        finish = float((packet.pts + (packet.duration or 0)) * base)
        end = max(end, finish)
    start = float((stream.start_time or 0) * base)
    return max(0.0, end - start), count if stream.type == "video" else None
