"""fal-style webhooks: Ed25519 over `request_id\\nuser_id\\ntimestamp\\nsha256_hex(body)`."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

log = logging.getLogger("emulator.webhooks")
USER_ID = "emulator-user"


class WebhookSigner:
    def __init__(self) -> None:
        self.key = Ed25519PrivateKey.generate()
        raw = self.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.public_key_b64url = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
        self.kid = hashlib.sha256(raw).hexdigest()[:16]

    def jwks(self) -> dict[str, Any]:
        return {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": self.public_key_b64url, "kid": self.kid, "use": "sig"}]}

    def headers(self, request_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
        timestamp = timestamp or int(time.time())
        message = f"{request_id}\n{USER_ID}\n{timestamp}\n{hashlib.sha256(body).hexdigest()}"
        signature = self.key.sign(message.encode()).hex()
        return {
            "Content-Type": "application/json",
            "X-Fal-Webhook-Request-Id": request_id,
            "X-Fal-Webhook-User-Id": USER_ID,
            "X-Fal-Webhook-Timestamp": str(timestamp),
            "X-Fal-Webhook-Signature": signature,
        }


# fal: "If the webhook fails to deliver the payload, it will retry 10 times in the span of 2 hours"
# (docs: model-endpoints/webhooks, "Retry policy"). The docs give no spacing; this schedule doubles
# each wait so that 10 attempts span 2 hours: 9 gaps of 14 s, 28 s, ... 1 h (sum 2 h).
WEBHOOK_ATTEMPTS = 10
WEBHOOK_SPAN_S = 2 * 3600.0
_FIRST_GAP_S = WEBHOOK_SPAN_S / (2 ** (WEBHOOK_ATTEMPTS - 1) - 1)


def retry_gaps(time_scale: float = 1.0) -> list[float]:
    """Seconds to wait before each retry (attempts 2..10), shrunk by `time_scale` in tests."""
    return [_FIRST_GAP_S * 2**n * time_scale for n in range(WEBHOOK_ATTEMPTS - 1)]


async def deliver(
    client: httpx.AsyncClient, signer: WebhookSigner, url: str, payload: dict[str, Any],
    time_scale: float = 1.0, on_attempt: Callable[[], None] | None = None,
) -> int:  # fmt: skip
    """POST until a 2xx, on fal's retry schedule; returns the number of attempts made."""
    body = json.dumps(payload).encode()
    gaps = retry_gaps(time_scale)
    for attempt in range(1, WEBHOOK_ATTEMPTS + 1):
        if on_attempt is not None:
            on_attempt()
        try:
            response = await client.post(url, content=body, headers=signer.headers(payload["request_id"], body))
            if 200 <= response.status_code < 300:
                return attempt
            log.info("webhook %s answered %s", url, response.status_code)
        except httpx.HTTPError as exc:
            log.info("webhook %s failed: %s", url, type(exc).__name__)
        if attempt < WEBHOOK_ATTEMPTS:
            await asyncio.sleep(gaps[attempt - 1])
    return WEBHOOK_ATTEMPTS
