"""The emulator's `copy` mode muxes a pair of inputs once and serves the same bytes again."""

from __future__ import annotations

from pathlib import Path

from emulator import media
from emulator.schema import SyncMode
from lipsync.probe import probe
from lipsync.samples import make_audio, make_video


def test_the_same_inputs_get_the_first_output_and_other_inputs_their_own(tmp_path: Path) -> None:
    video = make_video(str(tmp_path / "v.mp4"), 2.0)
    short, long = make_audio(str(tmp_path / "a1.wav"), 1.0), make_audio(str(tmp_path / "a2.wav"), 1.5)
    cache = media.CopyCache(tmp_path / "cache", entries=1)
    first = media.process(video, short, SyncMode.cut_off, str(tmp_path / "1.mp4"), "copy", cache)
    kept = tmp_path / "cache" / f"{media.CopyCache.key(video, short, SyncMode.cut_off)}.mp4"
    assert kept.read_bytes() == (tmp_path / "1.mp4").read_bytes()
    kept.write_bytes(b"the kept output")  # what the next request gets must come from here
    again = media.process(video, short, SyncMode.cut_off, str(tmp_path / "2.mp4"), "copy", cache)
    assert first == again == 1.0
    assert (tmp_path / "2.mp4").read_bytes() == b"the kept output"
    # Other audio: its own output, not the cached one (and the first is evicted: one entry).
    other = media.process(video, long, SyncMode.cut_off, str(tmp_path / "3.mp4"), "copy", cache)
    assert other == 1.5 and abs(probe(str(tmp_path / "3.mp4")).duration - 1.5) < 0.1
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        f"{media.CopyCache.key(video, long, SyncMode.cut_off)}.mp4"
    ]
    # Another sync mode is another output.
    assert media.CopyCache.key(video, short, SyncMode.loop) != media.CopyCache.key(video, short, SyncMode.cut_off)


def test_encode_mode_is_never_cached(tmp_path: Path) -> None:
    video = make_video(str(tmp_path / "v.mp4"), 1.0)
    audio = make_audio(str(tmp_path / "a.wav"), 1.0)
    cache = media.CopyCache(tmp_path / "cache")
    media.process(video, audio, SyncMode.cut_off, str(tmp_path / "1.mp4"), "encode", cache)
    assert not (tmp_path / "cache").exists()
