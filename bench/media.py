"""Benchmark media: tiny inputs for the many-jobs scenarios, and big videos of an exact size
built by repeating one encoded GOP (stream copy), so a 2 GB file takes seconds, not an encode."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from lipsync.samples import make_audio, make_video


def tiny_inputs(folder: Path, seconds: float = 1.0) -> tuple[Path, Path]:
    """A one-second 320x240 video and one second of speech-like audio (tens of KB each)."""
    folder.mkdir(parents=True, exist_ok=True)
    video, audio = folder / "tiny.mp4", folder / "tiny.wav"
    if not video.exists():
        make_video(str(video), seconds)
    if not audio.exists():
        make_audio(str(audio), seconds)
    return video, audio


def _noise_gop(path: Path, fps: int, width: int, height: int) -> None:
    """One second of noise (incompressible: about a megabyte a frame), one GOP."""
    rng = np.random.default_rng(7)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "g": str(fps)})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = Fraction(1, fps)
        for index in range(fps):
            image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = index
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def big_video(path: Path, target_bytes: int, fps: int = 25, width: int = 1280, height: int = 720) -> tuple[Path, float]:
    """An H.264 MP4 of about `target_bytes`; returns (path, duration in seconds)."""
    gop = path.with_suffix(".gop.mp4")
    if not gop.exists():
        _noise_gop(gop, fps, width, height)
    with av.open(str(gop)) as source:
        packets = [p for p in source.demux(source.streams.video[0]) if p.size]
        gop_bytes = sum(p.size for p in packets)
        # At most the target (less a megabyte for the container): "2 GB" must stay within the
        # pipeline's 2 GiB input limit, which refuses anything larger.
        repeats = max(1, (target_bytes - 2**20) // gop_bytes)
        with av.open(str(path), "w", format="mp4") as container:
            out_stream = container.add_stream_from_template(source.streams.video[0])
            time_base = source.streams.video[0].time_base
            assert time_base is not None, "an MP4 stream always has a time base"
            ticks_per_second = round(1 / time_base)
            for repeat in range(repeats):
                offset = repeat * ticks_per_second  # each GOP lasts exactly one second
                for packet in packets:
                    packet.stream = out_stream
                    pts, dts = packet.pts, packet.dts
                    packet.pts = None if pts is None else pts + offset
                    packet.dts = None if dts is None else dts + offset
                    container.mux(packet)
                    packet.pts, packet.dts = pts, dts
    return path, float(repeats)


def audio_for(path: Path, seconds: float) -> Path:
    if not path.exists():
        make_audio(str(path), seconds)
    return path
