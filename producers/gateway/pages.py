"""Cursor pages over a sorted set of job ids (scored by creation time), newest first.

The cursor is the last item's (score, id), opaque to callers: a page never repeats or skips a
job however many jobs are created meanwhile or share a creation time.
"""

from __future__ import annotations

import base64
import binascii

from lipsync.errors import InvalidInput
from lipsync.jobstore import JobStore
from lipsync.models import JobStatus

SCAN_PAGE = 200  # ids read from an index at a time while filtering a page by status
MAX_SCANS = 25  # slices read per request at most: 5,000 ids


class InvalidCursor(InvalidInput):
    code = "invalid_cursor"


# pagination ------------------------------------------------------------------------------------
def encode_cursor(score: float, job_id: str) -> str:
    return base64.urlsafe_b64encode(f"{score!r}|{job_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> tuple[float, str] | None:
    if cursor is None:
        return None
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        score, job_id = text.split("|", 1)
        value = float(score)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidCursor("this cursor was not given by this API") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise InvalidCursor("this cursor was not given by this API")
    return value, job_id


def page_of_ids(
    store: JobStore, index: str, after: tuple[float, str] | None, limit: int, status: JobStatus | None
) -> tuple[list[str], str | None]:
    """Ids from a sorted set (score = creation time), newest first, strictly after the cursor.

    A status filter reads at most `MAX_SCANS` slices of the index per request: a page may then
    be short, and its cursor carries on from where the reading stopped.
    """
    found: list[tuple[str, float]] = []
    top: float | str = "+inf" if after is None else after[0]
    skip_through = after
    last_seen: tuple[str, float] | None = None
    exhausted = False
    for _ in range(MAX_SCANS):
        entries = store.redis.zrevrangebyscore(index, top, "-inf", start=0, num=SCAN_PAGE, withscores=True)
        batch = [(raw.decode(), float(score)) for raw, score in entries]
        if skip_through is not None:
            # Equal scores come in reverse lexicographic order: skip what the cursor already passed.
            batch = [(i, s) for i, s in batch if s < skip_through[0] or i < skip_through[1]]
        if status is not None and batch:
            statuses = store.statuses(i for i, _ in batch)
            batch_matching = [(i, s) for i, s in batch if statuses.get(i) is status]
        else:
            batch_matching = batch
        for entry in batch_matching:
            found.append(entry)
            if len(found) == limit + 1:
                break
        if len(found) > limit:
            break
        if batch:
            last_seen = batch[-1]
        if len(entries) < SCAN_PAGE or not batch:
            exhausted = True
            break
        last_id, last_score = batch[-1]
        top, skip_through = last_score, (last_score, last_id)
    page = found[:limit]
    if len(found) > limit:
        return [i for i, _ in page], encode_cursor(page[-1][1], page[-1][0])
    if not exhausted and last_seen is not None:  # the scan budget ran out before the page filled
        return [i for i, _ in page], encode_cursor(last_seen[1], last_seen[0])
    return [i for i, _ in page], None
