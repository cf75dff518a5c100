"""Sample media made on the spot (PyAV): moving-pattern videos and speech-like audio of exact
lengths, for the demo, the tests and the benchmarks — no media files in the repository."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import av
import numpy as np


def make_video(
    path: str, seconds: float, fps: int = 25, width: int = 320, height: int = 240,
    with_audio: bool = False,
) -> str:  # fmt: skip
    """H.264 MP4 of exactly round(seconds·fps) frames; a bar sweeps so every frame differs."""
    frames = round(seconds * fps)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = Fraction(1, fps)
        sound = container.add_stream("aac", rate=16000) if with_audio else None
        base = np.zeros((height, width, 3), dtype=np.uint8)
        base[..., 0] = np.linspace(40, 200, width, dtype=np.uint8)[None, :]
        base[..., 2] = np.linspace(200, 40, height, dtype=np.uint8)[:, None]
        for index in range(frames):
            image = base.copy()
            x = int((index / max(1, frames - 1)) * (width - 20))
            image[:, x : x + 20] = (255, 255, 255)
            image[height // 2 - 10 : height // 2 + 10, (index * 7) % width] = (0, 0, 0)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = index
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if sound is not None:
            _write_audio(container, sound, seconds, 16000)
    return path


def make_audio(path: str, seconds: float, sample_rate: int = 16000) -> str:
    """Speech-like audio: syllable bursts of a voiced tone under an envelope. WAV (PCM) by
    default; .m4a/.aac/.mp3 by extension."""
    codec = "pcm_s16le"
    if path.endswith((".m4a", ".aac", ".mp4")):
        codec = "aac"
    elif path.endswith(".mp3"):
        codec = "libmp3lame"
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=sample_rate)
        _write_audio(container, stream, seconds, sample_rate)
    return path


def speech_like(seconds: float, sample_rate: int) -> np.ndarray:
    count = round(seconds * sample_rate)
    t = np.arange(count) / sample_rate
    pitch = 140 + 30 * np.sin(2 * math.pi * 0.7 * t)
    phase = 2 * math.pi * np.cumsum(pitch) / sample_rate
    voiced = np.sin(phase) + 0.5 * np.sin(2 * phase) + 0.25 * np.sin(3 * phase)
    syllables = np.clip(np.sin(2 * math.pi * 3.5 * t), 0, None) ** 0.5  # ~4 syllables/s
    pauses = (np.sin(2 * math.pi * 0.4 * t) > -0.8).astype(float)
    samples: np.ndarray = (0.25 * voiced * syllables * pauses).astype(np.float32)
    return samples


def _write_audio(container: av.container.OutputContainer, stream: Any, seconds: float, sample_rate: int) -> None:
    samples = speech_like(seconds, sample_rate)
    codec = stream.codec_context
    frame_size = codec.frame_size or 1024
    fmt = "s16" if codec.name.startswith("pcm_s16") else "fltp"
    for start in range(0, len(samples), frame_size):
        chunk = samples[start : start + frame_size]
        data = (chunk * 32767).astype(np.int16)[None, :] if fmt == "s16" else chunk[None, :]
        frame = av.AudioFrame.from_ndarray(data, format=fmt, layout="mono")
        frame.sample_rate = sample_rate
        frame.pts = start
        frame.time_base = Fraction(1, sample_rate)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
