"""Cross-cutting limits of the gateway, each one small piece: a body size cap (ASGI middleware)
and a per-key rate limit (a fixed one-second window in Redis, shared by every gateway process)."""

from __future__ import annotations

import json
import time

import redis
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodySizeLimit:
    """Refuse (413) a request body over `max_bytes`, declared or streamed, before any route reads it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._too_large(send)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send) -> None:
        payload = json.dumps(
            {"detail": f"the request body is over the limit of {self.max_bytes} bytes", "code": "too_large"}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": payload})


class RateLimiter:
    """At most `per_second` requests per key in each wall-clock second, counted in Redis."""

    def __init__(self, client: redis.Redis[bytes], prefix: str, per_second: int) -> None:
        self.redis = client
        self.prefix = prefix
        self.per_second = per_second

    def hit(self, key: str) -> float | None:
        """Count one request; None if allowed, else the seconds to wait."""
        if self.per_second <= 0:
            return None
        now = time.time()
        window = int(now)
        counter = f"{self.prefix}:ratelimit:{key}:{window}"
        pipe = self.redis.pipeline(transaction=False)
        pipe.incr(counter)
        pipe.expire(counter, 2)
        count, _ = pipe.execute()
        if int(count) <= self.per_second:
            return None
        return max(0.001, window + 1 - now)
