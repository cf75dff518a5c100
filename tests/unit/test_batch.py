"""Batch manifests: JSONL and CSV; a bad line is reported with its number."""

from __future__ import annotations

from pathlib import Path

import pytest

from lipsync.errors import LipsyncError
from producers.batch import read_manifest


def test_jsonl_manifest_reports_bad_lines_and_keeps_good_ones(tmp_path: Path) -> None:
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text(
        '{"video": "a.mp4", "audio": "a.wav", "sync_mode": "loop", "metadata": {"ad": "7"}}\n'
        "\n# a comment\n"
        "{not json\n"
        '{"video": "b.mp4"}\n'
        '{"video": "c.mp4", "audio": "c.wav", "colour": "red"}\n'
        '["a", "b"]\n'
    )
    entries, errors = read_manifest(manifest)
    assert [(e.video, e.sync_mode, e.metadata) for e in entries] == [("a.mp4", "loop", {"ad": "7"})]
    assert [(e.line, e.message.split(":")[0]) for e in errors] == [
        (4, "not valid JSON"), (5, "no audio given (column 'audio')"), (6, "unknown column(s) colour; known"),
        (7, "each line must be a JSON object"),
    ]  # fmt: skip


def test_csv_manifest_with_options_column(tmp_path: Path) -> None:
    manifest = tmp_path / "jobs.csv"
    manifest.write_text('video,audio,sync_mode,options\na.mp4,a.wav,remap,"{""model_mode"": ""lips""}"\nb.mp4,,,\n')
    entries, errors = read_manifest(manifest)
    assert entries[0].options == {"model_mode": "lips"} and entries[0].sync_mode == "remap"
    assert errors[0].line == 3 and "no audio" in errors[0].message


def test_a_csv_without_a_header_line_is_refused_in_words(tmp_path: Path) -> None:
    manifest = tmp_path / "pairs.csv"
    manifest.write_text("a.mp4,a.wav\nb.mp4,b.wav\n")
    with pytest.raises(LipsyncError, match="has no header line naming its columns"):
        read_manifest(manifest)


def test_extra_csv_fields_are_reported_not_dropped(tmp_path: Path) -> None:
    manifest = tmp_path / "pairs.csv"
    manifest.write_text("video,audio\na.mp4,a.wav,loop\nb.mp4,b.wav\n")
    entries, errors = read_manifest(manifest)
    assert [e.video for e in entries] == ["b.mp4"]
    assert [(e.line, e.message) for e in errors] == [(2, "1 field(s) more than the header's 2 columns")]


def test_numbers_in_metadata_are_refused_and_errors_name_the_column(tmp_path: Path) -> None:
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text(
        '{"video": "a.mp4", "audio": "a.wav", "metadata": {"ad": 17}}\n'
        '{"video": "a.mp4", "audio": "a.wav", "options": "{bad"}\n'
        '{"audio": "a.wav"}\n'
    )
    entries, errors = read_manifest(manifest)
    assert entries == []
    assert [(e.line, e.message) for e in errors] == [
        (1, "column 'metadata': the value of 'ad' is 17, not a string; quote it"),
        (2, "column 'options' is not valid JSON: Expecting property name enclosed in double quotes at position 1"),
        (3, "no video given (column 'video')"),
    ]
