"""Where a producer's media comes from: https URLs, s3:// URIs, local files and data: URIs.

Local files and data: URIs are uploaded to the staging bucket (content-addressed), so what
reaches the broker and the job record is always a URL, never media.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import mimetypes
import os
import re
import tempfile
import urllib.parse
from pathlib import Path

from config.settings import Settings
from lipsync.errors import InvalidInput, TooLarge
from lipsync.fetcher import GuardedFetcher
from lipsync.storage import Storage, parse_s3_uri

_DATA_URI = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w-]+=[^;,]*)*)(?P<b64>;base64)?,", re.I)
_CHUNK = 1024 * 1024


def resolve_source(
    role: str,
    source: str,
    *,
    settings: Settings,
    storage: Storage,
    fetcher: GuardedFetcher,
    base_dir: Path | None = None,
) -> str:
    """Turn what a user gave as `role` (video or audio) into an https:// or s3:// URL."""
    source = source.strip()
    if not source:
        raise InvalidInput(f"the {role} source is empty")
    lowered = source.lower()
    if lowered.startswith("s3://"):
        parse_s3_uri(source)
        return source
    if lowered.startswith(("https://", "http://")):
        fetcher.check_url(source)
        return source
    if lowered.startswith("data:"):
        return _upload_data_uri(role, source, settings, storage)
    scheme = urllib.parse.urlsplit(source).scheme
    if scheme and len(scheme) > 1 and "://" in source:
        raise InvalidInput(
            f"the {role} source uses the scheme '{scheme}'; give an https:// URL, an s3:// URI, "
            "a local file path or a data: URI"
        )
    path = Path(source).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    return _upload_file(role, path, settings, storage)


def _upload_file(role: str, path: Path, settings: Settings, storage: Storage) -> str:
    if not path.exists():
        raise InvalidInput(f"the {role} file {str(path)!r} does not exist")
    if not path.is_file():
        raise InvalidInput(f"the {role} source {str(path)!r} is not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise InvalidInput(f"the {role} file {str(path)!r} is empty (0 bytes)")
    if size > settings.max_input_bytes:
        raise TooLarge(
            f"the {role} file {str(path)!r} is {size} bytes, over the limit of {settings.max_input_bytes} bytes"
        )
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return _upload_path(str(path), digest.hexdigest(), path.suffix, settings, storage)


def _upload_path(path: str, sha256: str, suffix: str, settings: Settings, storage: Storage) -> str:
    # The key is the content's digest: the same file uploaded twice is one object, and
    # a user's file name (unicode, "../", spaces) never becomes part of a key.
    suffix = suffix.lower() if re.fullmatch(r"\.[A-Za-z0-9]{1,8}", suffix) else ""
    key = f"{settings.upload_prefix}/{sha256}{suffix}"
    if not storage.exists(key):
        content_type = mimetypes.guess_type(f"x{suffix}")[0] or "application/octet-stream"
        storage.upload_file(path, key, content_type=content_type, metadata={"sha256": sha256})
    return storage.uri(key)


def _upload_data_uri(role: str, uri: str, settings: Settings, storage: Storage) -> str:
    header = _DATA_URI.match(uri)
    if header is None:
        raise InvalidInput(f"the {role} data: URI is malformed; expected data:<type>;base64,<data>")
    payload = uri[header.end() :]
    if len(payload) * 3 // 4 > settings.max_input_bytes:
        raise TooLarge(f"the {role} data: URI is over the limit of {settings.max_input_bytes} bytes")
    try:
        if header.group("b64"):
            body = base64.b64decode(payload, validate=True)
        else:
            body = urllib.parse.unquote_to_bytes(payload)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"the {role} data: URI does not hold valid base64 data") from None
    if not body:
        raise InvalidInput(f"the {role} data: URI holds no data (0 bytes)")
    mime = (header.group("type") or "").lower()
    suffix = mimetypes.guess_extension(mime) or "" if mime else ""
    with tempfile.NamedTemporaryFile(prefix="lipsync-data-", suffix=suffix, dir=settings.work_dir or None) as handle:
        handle.write(body)
        handle.flush()
        return _upload_path(handle.name, hashlib.sha256(body).hexdigest(), suffix, settings, storage)


def is_local(source: str) -> bool:
    return "://" not in source and not source.lower().startswith("data:") and os.path.exists(source)
