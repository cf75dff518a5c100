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
