"""Callbacks to tenants: the job's JSON POSTed to its `callback_url`, signed with the tenant's secret.

`X-Lipsync-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">` — the scheme
Stripe made familiar, so platforms verify it with the standard library (docs/gateway.md).
The URL obeys the guarded fetcher's rules (public addresses only unless allowed), the
connection goes to the address that was checked, and redirects are not followed.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import time
import urllib.parse

import httpx

from lipsync.errors import RetryableError, UnsafeURL
from lipsync.fetcher import GuardedFetcher, is_public_address, redact_url

SIGNATURE_HEADER = "X-Lipsync-Signature"
DELIVERY_HEADER = "X-Lipsync-Delivery"
USER_AGENT = "lipsync-callbacks/1"


def sign(secret: str, body: bytes, timestamp: int) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, body: bytes, header: str, *, tolerance_s: float = 300.0, now: float | None = None) -> bool:
    """The receiving side's check (the same as the documented snippet)."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, parts.get("v1", ""))


class CallbackSender:
    def __init__(self, fetcher: GuardedFetcher, *, timeout_s: float = 10.0) -> None:
        self.fetcher = fetcher
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout_s, connect=min(5.0, timeout_s)),
            follow_redirects=False,
            trust_env=False,  # a proxy from the environment would undo the pinning
        )

    def close(self) -> None:
        self._http.close()

    def post(self, url: str, body: bytes, secret: str, delivery_id: str) -> int:
        """POST once; returns the HTTP status. Raises UnsafeURL (give up) or RetryableError."""
        self.fetcher.check_url(url)  # scheme, credentials, private addresses: the fetcher's rules
        parts = urllib.parse.urlsplit(url)
        host = (parts.hostname or "").lower()
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        address = self._pin(host, port, url)
        ip_host = f"[{address}]" if ":" in address else address
        pinned = urllib.parse.urlunsplit(
            (parts.scheme, ip_host + (f":{parts.port}" if parts.port else ""), parts.path or "/", parts.query, "")
        )
        headers = {
            "Host": parts.netloc.rsplit("@", 1)[-1],
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            SIGNATURE_HEADER: sign(secret, body, int(time.time())),
            DELIVERY_HEADER: delivery_id,
        }
        try:
            response = self._http.post(pinned, content=body, headers=headers, extensions={"sni_hostname": host})
        except httpx.HTTPError as exc:
            raise RetryableError(
                f"could not reach {redact_url(url)}: {type(exc).__name__}", code="callback_failed"
            ) from None
        return response.status_code

    def _pin(self, host: str, port: int, url: str) -> str:
        """Resolve once more and connect to an address checked now (no DNS rebinding in between)."""
        try:
            return str(ipaddress.ip_address(host))
        except ValueError:
            pass
        addresses = self.fetcher.resolver(host, port)
        allowed = host in self.fetcher.allowed
        for address in addresses:
            if not allowed and address not in self.fetcher.allowed and not is_public_address(address):
                raise UnsafeURL(f"{redact_url(url)} points to a private or internal address ({address})")
        if not addresses:
            raise RetryableError(f"{redact_url(url)}: the host resolved to no address", code="callback_failed")
        return addresses[0]
