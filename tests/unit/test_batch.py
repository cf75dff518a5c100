"""Batch manifests: JSONL and CSV; a bad line is reported with its number."""

from __future__ import annotations

from pathlib import Path

from producers.batch import read_manifest


def test_jsonl_manifest_reports_bad_lines_and_keeps_good_ones(tmp_path: Path) -> None:
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text(
        '{"video": "a.mp4", "audio": "a.wav", "sync_mode": "loop", "metadata": {"ad": 7}}\n'
        "\n# a comment\n"
        "{not json\n"
        '{"video": "b.mp4"}\n'
        '{"video": "c.mp4", "audio": "c.wav", "colour": "red"}\n'
        '["a", "b"]\n'
    )
    entries, errors = read_manifest(manifest)
    assert [(e.video, e.sync_mode, e.metadata) for e in entries] == [("a.mp4", "loop", {"ad": "7"})]
    assert [(e.line, e.message.split(":")[0]) for e in errors] == [
        (4, "not valid JSON"), (5, "no audio given"), (6, "unknown column(s) colour; known"),
        (7, "each line must be a JSON object"),
    ]  # fmt: skip


def test_csv_manifest_with_options_column(tmp_path: Path) -> None:
    manifest = tmp_path / "jobs.csv"
    manifest.write_text('video,audio,sync_mode,options\na.mp4,a.wav,remap,"{""model_mode"": ""lips""}"\nb.mp4,,,\n')
    entries, errors = read_manifest(manifest)
    assert entries[0].options == {"model_mode": "lips"} and entries[0].sync_mode == "remap"
    assert errors[0].line == 3 and "no audio" in errors[0].message
