"""Batch manifests: JSONL or CSV of (video, audio) pairs, each line its own request.

A bad line is reported with its line number and submits nothing; the good lines go on.
"""

from __future__ import annotations

import csv
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lipsync.errors import LipsyncError
from lipsync.models import Job
from producers.api import BrokerUnavailable, LipsyncClient

_CSV_OPTIONAL = ("sync_mode", "options", "idempotency_key", "metadata")
_KNOWN = {"video", "audio", "video_url", "audio_url", "sync_mode", "options", "idempotency_key", "metadata"}


@dataclass
class BatchEntry:
    line: int
    video: str
    audio: str
    sync_mode: str | None = None
    options: dict[str, Any] | None = None
    idempotency_key: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class ManifestError:
    line: int
    message: str


@dataclass
class BatchSubmission:
    batch_id: str
    jobs: list[tuple[BatchEntry, Job]]
    errors: list[ManifestError]
    # Set when the broker could not be reached: the jobs are recorded and start once it is back.
    broker_down: BrokerUnavailable | None = None


def read_manifest(path: Path) -> tuple[list[BatchEntry], list[ManifestError]]:
    if not path.is_file():
        raise LipsyncError(f"the manifest {str(path)!r} does not exist")
    if path.suffix.lower() == ".csv":
        return _read_csv(path)
    return _read_jsonl(path)


def _entry(line: int, row: dict[str, Any]) -> BatchEntry:
    unknown = sorted(set(row) - _KNOWN)
    if unknown:
        raise ValueError(f"unknown column(s) {', '.join(unknown)}; known: {', '.join(sorted(_KNOWN))}")
    video = row.get("video") or row.get("video_url")
    audio = row.get("audio") or row.get("audio_url")
    if not isinstance(video, str) or not video.strip():
        raise ValueError("no video given (column 'video')")
    if not isinstance(audio, str) or not audio.strip():
        raise ValueError("no audio given (column 'audio')")
    options = _json_column(row, "options", None)
    if options is not None and not isinstance(options, dict):
        raise ValueError("column 'options' must be a JSON object")
    return BatchEntry(
        line=line,
        video=video.strip(),
        audio=audio.strip(),
        sync_mode=(row.get("sync_mode") or None),
        options=options,
        idempotency_key=(row.get("idempotency_key") or None),
        metadata=metadata_strings(_json_column(row, "metadata", {}) or {}, "column 'metadata'"),
    )


def _json_column(row: dict[str, Any], name: str, empty: Any) -> Any:
    value = row.get(name)
    if not isinstance(value, str):
        return value
    if not value.strip():
        return empty
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"column {name!r} is not valid JSON: {exc.msg} at position {exc.pos}") from None


def metadata_strings(metadata: Any, where: str = "metadata") -> dict[str, str]:
    """Metadata as given: a JSON object of strings. A number is refused, not turned into text
    silently (17 and "017" would both come back as "17" and "017", not as what was meant)."""
    if not isinstance(metadata, dict):
        raise ValueError(f"{where} must be a JSON object of strings")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise ValueError(f"{where}: the value of {key!r} is {json.dumps(value)}, not a string; quote it")
    return {str(key): value for key, value in metadata.items()}


def _read_jsonl(path: Path) -> tuple[list[BatchEntry], list[ManifestError]]:
    entries, errors = [], []
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip() or text.lstrip().startswith("#"):
                continue
            try:
                row = json.loads(text)
                if not isinstance(row, dict):
                    raise ValueError("each line must be a JSON object")
                entries.append(_entry(number, row))
            except json.JSONDecodeError as exc:
                errors.append(ManifestError(number, f"not valid JSON: {exc.msg}"))
            except ValueError as exc:
                errors.append(ManifestError(number, str(exc)))
    return entries, errors


def _read_csv(path: Path) -> tuple[list[BatchEntry], list[ManifestError]]:
    entries, errors = [], []
    with path.open(encoding="utf-8", errors="replace", newline="") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in reader.fieldnames or []]
        if header and not ({"video", "video_url"} & set(header) and {"audio", "audio_url"} & set(header)):
            # A header-less manifest would otherwise read its first pair as column names, and
            # every other line as unknown columns: say what is missing instead.
            raise LipsyncError(
                f"the CSV manifest {path.name!r} has no header line naming its columns "
                f"(first line: {','.join(header)[:80]!r}); start it with: video,audio[,{','.join(_CSV_OPTIONAL)}]"
            )
        for row in reader:
            number = reader.line_num
            extra = row.pop(None, None)
            if extra:
                errors.append(
                    ManifestError(number, f"{len(extra)} field(s) more than the header's {len(header)} columns")
                )
                continue
            try:
                entries.append(_entry(number, {k.strip(): v for k, v in row.items() if k}))
            except ValueError as exc:
                errors.append(ManifestError(number, str(exc)))
    return entries, errors


def submit_batch(client: LipsyncClient, path: Path) -> BatchSubmission:
    entries, errors = read_manifest(path)
    client.redis.ping()  # the job store first: with Redis down, one error, not one per line after uploads
    batch_id = uuid.uuid4().hex[:12]
    jobs: list[tuple[BatchEntry, Job]] = []
    broker_down: BrokerUnavailable | None = None
    for entry in entries:
        try:
            job = client.submit(
                entry.video,
                entry.audio,
                sync_mode=entry.sync_mode,
                options=entry.options,
                idempotency_key=entry.idempotency_key,
                metadata=entry.metadata,
                batch_id=batch_id,
                base_dir=path.parent,
            )
        except BrokerUnavailable as exc:  # recorded: it starts when the broker is back
            broker_down = exc
            job = exc.job
        except LipsyncError as exc:
            if exc.code == "misconfigured":  # not this line's fault: every line would say it
                raise
            errors.append(ManifestError(entry.line, exc.message))
            continue
        jobs.append((entry, job))
    errors.sort(key=lambda error: error.line)  # reading and submitting found them: line order
    return BatchSubmission(batch_id=batch_id, jobs=jobs, errors=errors, broker_down=broker_down)
