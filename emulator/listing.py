"""fal's request listing, `GET /v1/models/requests/by-endpoint` (api.fal.ai), served on the emulator's host.

From fal's Platform API reference (docs: platform-apis/v1/models/requests/by-endpoint):
- query: `endpoint_id` (required), `limit` (1-100, default 50), `cursor` (opaque; fal's example
  "Mg==" is base64 of a page number), `start`/`end` (ISO 8601; default the last 24 hours to now;
  the serverless twin widens the default to 90 days when `request_id` is given, done here too),
  `status` (success, error, user_error), `request_id`, `expand=payloads` (adds `json_input` and
  `json_output`), `sort_by` (ended_at, the default, or duration).
- answer: `{"items": [...], "next_cursor": str | null, "has_more": bool}`; an item has
  `request_id, endpoint_id, sent_at, started_at, ended_at, status_code, duration` (+ payloads).
Where the docs are silent, this is a choice, said here: the listing holds the caller's own
requests only, newest first; requests not ended yet are listed too (first, with `ended_at`,
`status_code` and `duration` null, and `started_at` null while IN_QUEUE) unless the emulator runs
with `listing_unfinished` off; the time window applies to `sent_at`. There is no filter by input:
a caller that looks for its request by input pages through `expand=payloads` and compares.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

MAX_LIMIT = 100
DEFAULT_LIMIT = 50
STATUSES = ("success", "error", "user_error")


class ListedRequest(Protocol):
    id: str
    endpoint: str
    account: str
    arguments: dict[str, Any]
    created: float
    started: float | None
    finished: float | None
    status: str
    output: dict[str, Any] | None
    error: str | None
    error_status: int
    error_body: Any


class ListingRefused(ValueError):
    """A query fal would answer with 422; the message says which parameter."""


def _when(text: str, name: str) -> float:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ListingRefused(f"{name} must be an ISO 8601 date or time, not {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _iso(moment: float | None) -> str | None:
    if moment is None:
        return None
    return datetime.fromtimestamp(moment, UTC).isoformat().replace("+00:00", "Z")


def status_code(found: ListedRequest) -> int | None:
    if found.status != "COMPLETED":
        return None
    return found.error_status if found.error else 200


def status_class(code: int | None) -> str | None:
    if code is None:
        return None
    if code < 400:
        return "success"
    return "user_error" if code < 500 else "error"


def item(found: ListedRequest, payloads: bool) -> dict[str, Any]:
    code = status_code(found)
    ended = found.finished if found.status == "COMPLETED" else None
    entry: dict[str, Any] = {
        "request_id": found.id, "endpoint_id": found.endpoint,
        "sent_at": _iso(found.created), "started_at": _iso(found.started), "ended_at": _iso(ended),
        "status_code": code,
        "duration": round(ended - (found.started or ended), 3) if ended is not None else None,
    }  # fmt: skip
    if payloads:
        entry["json_input"] = found.arguments
        entry["json_output"] = (found.error_body if found.error else found.output) if code is not None else None
    return entry


def list_requests(
    requests: Iterable[ListedRequest], account: str, query: dict[str, list[str]], now: float, unfinished: bool = True
) -> dict[str, Any]:
    """One page of the account's requests for one endpoint; ListingRefused for a query fal refuses."""

    def one(name: str) -> str | None:
        values = query.get(name) or []
        return values[-1] if values else None

    endpoint = one("endpoint_id")
    if not endpoint:
        raise ListingRefused("endpoint_id is required")
    try:
        limit = int(one("limit") or DEFAULT_LIMIT)
    except ValueError:
        raise ListingRefused("limit must be an integer") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise ListingRefused(f"limit must be between 1 and {MAX_LIMIT}")
    page = 1
    if one("cursor"):
        try:
            page = int(base64.b64decode(one("cursor") or "", validate=True).decode())
        except (binascii.Error, ValueError):
            raise ListingRefused("cursor is not one this API gave") from None
    status = one("status")
    if status is not None and status not in STATUSES:
        raise ListingRefused(f"status must be one of {', '.join(STATUSES)}")
    sort_by = one("sort_by") or "ended_at"
    if sort_by not in ("ended_at", "duration"):
        raise ListingRefused("sort_by must be ended_at or duration")
    request_id = one("request_id")
    default_span = timedelta(days=90 if request_id else 1).total_seconds()
    start = _when(one("start") or "", "start") if one("start") else now - default_span
    end = _when(one("end") or "", "end") if one("end") else now + 1.0
    expand = {part for value in query.get("expand", []) for part in value.split(",")}
    chosen = [
        found
        for found in requests
        if found.account == account
        and found.endpoint == endpoint
        and start <= found.created < end
        and (request_id is None or found.id == request_id)
        and (unfinished or found.status == "COMPLETED")
        and (status is None or status_class(status_code(found)) == status)
    ]
    if sort_by == "duration":
        chosen.sort(key=lambda f: (f.finished or now) - (f.started or f.finished or now), reverse=True)
    else:  # newest end first; requests not ended yet come before every ended one
        chosen.sort(key=lambda f: (f.status != "COMPLETED", f.finished or 0.0, f.created), reverse=True)
    window = chosen[(page - 1) * limit : page * limit]
    more = len(chosen) > page * limit
    return {
        "items": [item(found, "payloads" in expand) for found in window],
        "next_cursor": base64.b64encode(str(page + 1).encode()).decode() if more else None,
        "has_more": more,
    }
