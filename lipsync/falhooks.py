"""Verifying fal's webhook deliveries, as fal signs them.

Ed25519 over `request_id\\nuser_id\\ntimestamp\\nsha256_hex(body)`, the signature in hex in
`X-Fal-Webhook-Signature`, the public keys from fal's JWKS URL (cached; fetched again at most
once a minute when a signature fails, so a key rotation is picked up), the timestamp within
a tolerance of our clock. `cryptography` does the Ed25519; nothing here is hand-rolled crypto.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from lipsync.errors import LipsyncError, RetryableError

HEADER_REQUEST_ID = "x-fal-webhook-request-id"
HEADER_USER_ID = "x-fal-webhook-user-id"
HEADER_TIMESTAMP = "x-fal-webhook-timestamp"
HEADER_SIGNATURE = "x-fal-webhook-signature"
_REFRESH_AFTER_FAILURE_S = 60.0
log = logging.getLogger("lipsync.falhooks")


class WebhookRejected(LipsyncError):
    """A delivery that is not fal's, or not now: refused with 401. `code` says why."""

    code = "webhook_rejected"


@dataclass(frozen=True)
class VerifiedDelivery:
    request_id: str
    user_id: str
    timestamp: int
    signature: str


def signed_message(request_id: str, user_id: str, timestamp: str, body: bytes) -> bytes:
    return f"{request_id}\n{user_id}\n{timestamp}\n{hashlib.sha256(body).hexdigest()}".encode()


def parse_jwks(document: object) -> list[Ed25519PublicKey]:
    """The Ed25519 keys of a JWKS document; other key types are skipped."""
    keys: list[Ed25519PublicKey] = []
    entries = document.get("keys") if isinstance(document, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict) or entry.get("kty") != "OKP" or entry.get("crv") != "Ed25519":
            continue
        x = entry.get("x")
        if not isinstance(x, str):
            continue
        try:
            raw = base64.urlsafe_b64decode(x + "=" * (-len(x) % 4))
            keys.append(Ed25519PublicKey.from_public_bytes(raw))
        except (ValueError, binascii.Error):
            continue
    return keys


class JwksCache:
    """fal's public keys, fetched from the JWKS URL and kept for `ttl_s`."""

    def __init__(
        self,
        url: str,
        *,
        ttl_s: float = 3600.0,
        timeout_s: float = 10.0,
        fetch: Callable[[str], object] | None = None,
    ) -> None:
        self.url = url
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self._fetch = fetch or self._http_fetch
        self._keys: list[Ed25519PublicKey] = []
        self._fetched_at = float("-inf")
        self._lock = threading.Lock()

    def _http_fetch(self, url: str) -> object:
        try:
            response = httpx.get(url, timeout=self.timeout_s, follow_redirects=True)
            response.raise_for_status()
            return response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise RetryableError(
                f"could not fetch fal's webhook keys: {type(exc).__name__}", code="jwks_unavailable"
            ) from None

    def keys(self, *, refresh: bool = False) -> list[Ed25519PublicKey]:
        with self._lock:
            age = time.monotonic() - self._fetched_at
            stale = age > self.ttl_s or not self._keys
            if stale or (refresh and age > _REFRESH_AFTER_FAILURE_S):
                try:
                    self._keys = parse_jwks(self._fetch(self.url))
                    self._fetched_at = time.monotonic()
                except RetryableError:
                    if not self._keys:
                        raise
                    # fal's key server is away: keep verifying with the keys we have, ask again soon.
                    log.warning("fal's JWKS could not be refreshed; using the cached keys")
                    self._fetched_at = time.monotonic() - self.ttl_s + _REFRESH_AFTER_FAILURE_S
            return list(self._keys)


def verify_delivery(
    headers: Mapping[str, str],
    body: bytes,
    jwks: JwksCache,
    *,
    tolerance_s: float = 300.0,
    now: float | None = None,
) -> VerifiedDelivery:
    """Check one delivery; raises `WebhookRejected` (code: malformed, stale, bad_signature)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    request_id = lowered.get(HEADER_REQUEST_ID, "")
    user_id = lowered.get(HEADER_USER_ID, "")
    timestamp = lowered.get(HEADER_TIMESTAMP, "")
    signature = lowered.get(HEADER_SIGNATURE, "")
    if not (request_id and user_id and timestamp and signature):
        raise WebhookRejected("a fal webhook header is missing", code="malformed")
    if not timestamp.isdigit() or len(timestamp) > 12:
        raise WebhookRejected("the webhook timestamp is not a number of seconds", code="malformed")
    if abs((time.time() if now is None else now) - int(timestamp)) > tolerance_s:
        raise WebhookRejected(
            f"the webhook timestamp is more than {tolerance_s:.0f} s away from our clock", code="stale"
        )
    try:
        signature_bytes = bytes.fromhex(signature)
    except ValueError:
        raise WebhookRejected("the webhook signature is not hex", code="malformed") from None
    if len(signature_bytes) != 64:
        raise WebhookRejected("the webhook signature is not 64 bytes", code="malformed")
    message = signed_message(request_id, user_id, timestamp, body)
    for refresh in (False, True):
        for key in jwks.keys(refresh=refresh):
            try:
                key.verify(signature_bytes, message)
            except InvalidSignature:
                continue
            return VerifiedDelivery(request_id, user_id, int(timestamp), signature)
    raise WebhookRejected("the webhook signature does not verify with fal's keys", code="bad_signature")
