"""A media error names the input it is about: with two inputs, "the file" leaves a person guessing."""

from __future__ import annotations

from pathlib import Path

import pytest

from lipsync.errors import InvalidInput
from lipsync.probe import probe


def test_an_unreadable_input_is_named_by_its_role(tmp_path: Path) -> None:
    fake = tmp_path / "dub.wav"
    fake.write_text("not audio, just text with an audio file's name\n" * 20)
    with pytest.raises(InvalidInput, match=r"^the audio input is not a readable audio or video file \("):
        probe(str(fake), "audio")
    with pytest.raises(InvalidInput, match=r"^the file is not a readable"):
        probe(str(fake))


def test_the_quick_probe_says_what_the_full_probe_says(tmp_path: Path) -> None:
    """The quick probe (FFmpeg's least probe size) is taken only when complete, and then it must
    agree with a probe that reads FFmpeg's default 5 MB."""
    import av

    from lipsync.probe import _probe
    from lipsync.samples import make_audio, make_video

    files = [
        make_video(str(tmp_path / "plain.mp4"), 2.0),
        make_video(str(tmp_path / "sound.mp4"), 3.0, fps=30, width=640, height=360, with_audio=True),
        make_audio(str(tmp_path / "16k.wav"), 2.0),
        make_audio(str(tmp_path / "44k.wav"), 5.0, sample_rate=44100),
    ]
    for path in files:
        with av.open(path, metadata_errors="ignore") as container:
            full = _probe(container)
        assert probe(path) == full, path
