"""Media in transit: a temp file that hashes what is written to it and keeps the lease alive."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import BinaryIO


class HashingWriter:
    """Wraps a file: every write is hashed (sha256) and reported, so nothing is read twice."""

    def __init__(self, target: BinaryIO, on_write: Callable[[], None] | None = None) -> None:
        self.target = target
        self.digest = hashlib.sha256()
        self.size = 0
        self.on_write = on_write

    def write(self, chunk: bytes) -> int:
        self.digest.update(chunk)
        self.size += len(chunk)
        if self.on_write is not None:
            self.on_write()
        return self.target.write(chunk)

    def flush(self) -> None:
        self.target.flush()

    def writable(self) -> bool:
        return True

    @property
    def sha256(self) -> str:
        return self.digest.hexdigest()


@contextmanager
def spool(work_dir: str, suffix: str = "") -> Iterator[tuple[str, BinaryIO]]:
    """A named temp file on disk (never the whole medium in memory), removed afterwards."""
    handle, path = tempfile.mkstemp(prefix="lipsync-", suffix=suffix, dir=work_dir or None)
    try:
        with os.fdopen(handle, "w+b") as fileobj:
            yield path, fileobj
    finally:
        with suppress(FileNotFoundError):
            os.unlink(path)
