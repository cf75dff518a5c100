"""The emulator's media work: align audio and video as `sync_mode` says, mux, encode H.264 + AAC.

It does not move lips. Frames are picked by index (cut, repeated, bounced, frozen or retimed)
and the audio is cut or padded, so the output has exactly the length the model's would.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import threading
from collections import OrderedDict
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from emulator.schema import SyncMode, output_duration
from lipsync.probe import probe

AUDIO_RATE = 44100


class MediaError(Exception):
    """The inputs cannot be processed; the message says why, as the model would."""


def source_frame(mode: SyncMode, index: int, source_frames: int, output_frames: int) -> int:
    """Which input frame the `index`-th output frame shows."""
    last = source_frames - 1
    if mode is SyncMode.loop:
        return index % source_frames
    if mode is SyncMode.bounce:
        if source_frames == 1:
            return 0
        period = 2 * last
        step = index % period
        return step if step <= last else period - step
    if mode is SyncMode.remap:
        return min(last, math.floor(index * source_frames / output_frames))
    return min(index, last)  # cut_off cuts; silence holds the last frame if the audio runs on


def _audio_samples(path: str) -> np.ndarray:
    resampler = av.AudioResampler(format="fltp", layout="mono", rate=AUDIO_RATE)
    chunks: list[np.ndarray] = []
    with av.open(path) as container:
        if not container.streams.audio:
            raise MediaError("audio_url has no audio stream")
        for frame in container.decode(audio=0):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray()[0])
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray()[0])
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)


class CopyCache:
    """Outputs of `copy` mode by the digest of their inputs and sync mode, so the same inputs are
    muxed once: a benchmark sends the same pair thousands of times, and the AAC encode of each
    (~35 ms of CPU) ran on the cores the pipeline under measurement shares. The bytes served are
    the ones the first encode wrote. `encode` mode is never cached."""

    def __init__(self, folder: Path, entries: int = 32) -> None:
        self.folder, self.entries = folder, entries
        self._kept: OrderedDict[str, tuple[Path, float]] = OrderedDict()  # key -> (file, duration)
        self._lock = threading.Lock()

    @staticmethod
    def key(video_path: str, audio_path: str, mode: SyncMode) -> str:
        digest = hashlib.sha256(mode.value.encode())
        for path in (video_path, audio_path):
            with open(path, "rb") as handle:
                digest.update(hashlib.file_digest(handle, "sha256").digest())
        return digest.hexdigest()

    def get(self, key: str, out_path: str) -> float | None:
        with self._lock:
            found = self._kept.get(key)
            if found is None:
                return None
            self._kept.move_to_end(key)
            shutil.copyfile(found[0], out_path)  # under the lock: an eviction cannot unlink it meanwhile
        return found[1]

    def put(self, key: str, out_path: str, duration: float) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        kept = self.folder / f"{key}.mp4"
        with self._lock:
            shutil.copyfile(out_path, kept)
            self._kept[key] = (kept, duration)
            while len(self._kept) > self.entries:
                _, (old, _) = self._kept.popitem(last=False)
                old.unlink(missing_ok=True)


def process(
    video_path: str,
    audio_path: str,
    mode: SyncMode,
    out_path: str,
    media_mode: str,
    cache: CopyCache | None = None,
) -> float:
    """Write the aligned output; returns its intended duration in seconds. In `copy` mode with a
    cache, inputs seen before get the output written for them then."""
    key = CopyCache.key(video_path, audio_path, mode) if cache is not None and media_mode == "copy" else None
    if key is not None and cache is not None:
        duration = cache.get(key, out_path)
        if duration is not None:
            return duration
    duration = _process(video_path, audio_path, mode, out_path, media_mode)
    if key is not None and cache is not None:
        cache.put(key, out_path, duration)
    return duration


def _process(video_path: str, audio_path: str, mode: SyncMode, out_path: str, media_mode: str) -> float:
    try:
        video_info, audio_info = probe(video_path), probe(audio_path)
    except Exception as exc:
        raise MediaError(str(exc)) from None
    if not video_info.has_video:
        raise MediaError("video_url has no video stream")
    if not audio_info.has_audio:
        raise MediaError("audio_url has no audio stream")
    fps = video_info.fps or 25.0
    target = output_duration(mode, video_info.duration, audio_info.duration)
    source_frames = video_info.num_frames or max(1, round(video_info.duration * fps))
    output_frames = max(1, round(target * fps))
    audio = _audio_samples(audio_path)
    wanted = round(target * AUDIO_RATE)
    audio = audio[:wanted] if len(audio) >= wanted else np.pad(audio, (0, wanted - len(audio)))
    identity = (
        output_frames <= source_frames
        and mode is not SyncMode.remap
        or (mode is SyncMode.remap and output_frames == source_frames)
    )
    if media_mode == "copy" and identity and video_info.video_codec == "h264":
        _copy_video(video_path, out_path, audio, output_frames)
    else:
        _encode(video_path, out_path, audio, mode, fps, source_frames, output_frames)
    return target


def _audio_stream(container: av.container.OutputContainer) -> av.audio.stream.AudioStream:
    # Added before the first packet is muxed: the MP4 header is written then.
    stream = container.add_stream("aac", rate=AUDIO_RATE)
    stream.layout = "mono"
    return stream


def _write_audio(
    container: av.container.OutputContainer, stream: av.audio.stream.AudioStream, samples: np.ndarray
) -> None:
    size = 1024
    for start in range(0, len(samples), size):
        frame = av.AudioFrame.from_ndarray(
            samples[None, start : start + size].astype(np.float32), format="fltp", layout="mono"
        )
        frame.sample_rate, frame.pts, frame.time_base = AUDIO_RATE, start, Fraction(1, AUDIO_RATE)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def _encode(
    video_path: str, out_path: str, audio: np.ndarray, mode: SyncMode, fps: float,
    source_frames: int, output_frames: int,
) -> None:  # fmt: skip
    # Planes as arrays: a decoded frame carries its encoder state and cannot be re-encoded twice.
    frames: list[np.ndarray] = []
    with av.open(video_path) as source:
        for frame in source.decode(video=0):
            even = frame.reformat(
                width=frame.width - frame.width % 2, height=frame.height - frame.height % 2, format="yuv420p"
            )
            frames.append(even.to_ndarray())
            if mode is SyncMode.cut_off and len(frames) >= output_frames:
                break
    if not frames:
        raise MediaError("video_url has no decodable frames")
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(out_path, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate, options={"preset": "ultrafast", "crf": "30"})
        stream.height, stream.width = frames[0].shape[0] * 2 // 3, frames[0].shape[1]
        stream.pix_fmt = "yuv420p"
        sound = _audio_stream(container)
        for index in range(output_frames):
            picked = frames[min(len(frames) - 1, source_frame(mode, index, len(frames), output_frames))]
            frame = av.VideoFrame.from_ndarray(picked, format="yuv420p")
            frame.pts = index
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        _write_audio(container, sound, audio)


def _copy_video(video_path: str, out_path: str, audio: np.ndarray, output_frames: int) -> None:
    """Stream copy of the first `output_frames` frames: no decode, no encode (for benchmarks)."""
    with av.open(video_path) as source, av.open(out_path, "w", format="mp4") as container:
        in_stream = source.streams.video[0]
        out_stream = container.add_stream_from_template(in_stream)
        sound = _audio_stream(container)
        packets = [p for p in source.demux(in_stream) if p.size]
        packets.sort(key=lambda p: p.dts if p.dts is not None else 0)
        kept = sorted(p.pts for p in packets if p.pts is not None)[:output_frames]
        limit = kept[-1] if kept else 0
        for packet in packets:
            if packet.pts is not None and packet.pts > limit:
                continue
            packet.stream = out_stream
            container.mux(packet)
        _write_audio(container, sound, audio)
