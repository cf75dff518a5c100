"""Signatures both ways: fal's Ed25519 webhooks in, our HMAC callbacks out (and the documented snippet)."""

from __future__ import annotations

import base64
import hashlib
import re
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lipsync import callbacks
from lipsync.falhooks import JwksCache, WebhookRejected, parse_jwks, verify_delivery

DOCS = Path(__file__).resolve().parents[2] / "docs" / "gateway.md"


def documented_verifier() -> Any:
    """The verification snippet of docs/gateway.md, run as written."""
    text = DOCS.read_text()
    section = text.split("### Verifying a callback", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, "docs/gateway.md lost its verification snippet"
    namespace: dict[str, Any] = {}
    exec(compile(code.group(1), str(DOCS), "exec"), namespace)
    return namespace["verify_lipsync_signature"]


class FalSigner:
    """Signs as fal does; publishes its key as a JWKS document."""

    def __init__(self) -> None:
        self.key = Ed25519PrivateKey.generate()

    def jwks(self) -> dict[str, Any]:
        raw = self.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        x = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
        return {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x}, {"kty": "RSA", "n": "x", "e": "AQAB"}]}

    def headers(self, request_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
        stamp = str(timestamp or int(time.time()))
        message = f"{request_id}\nuser-1\n{stamp}\n{hashlib.sha256(body).hexdigest()}".encode()
        return {
            "X-Fal-Webhook-Request-Id": request_id,
            "X-Fal-Webhook-User-Id": "user-1",
            "X-Fal-Webhook-Timestamp": stamp,
            "X-Fal-Webhook-Signature": self.key.sign(message).hex(),
        }


def cache_for(*signers: FalSigner) -> tuple[JwksCache, list[int]]:
    fetches = [0]
    published = list(signers)

    def fetch(_: str) -> object:
        fetches[0] += 1
        return {"keys": [k for s in published for k in s.jwks()["keys"]]}

    return JwksCache("https://fal.invalid/jwks", fetch=fetch), fetches


BODY = b'{"request_id": "req-1", "status": "OK", "payload": {}}'


def test_genuine_fal_delivery_verifies() -> None:
    signer = FalSigner()
    jwks, _ = cache_for(signer)
    delivery = verify_delivery(signer.headers("req-1", BODY), BODY, jwks)
    assert delivery.request_id == "req-1" and delivery.user_id == "user-1"


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda h, b: (h, b + b" "), "bad_signature"),  # body tampered with
        (lambda h, b: ({**h, "X-Fal-Webhook-Request-Id": "req-2"}, b), "bad_signature"),
        (lambda h, b: ({**h, "X-Fal-Webhook-Signature": "zz" * 64}, b), "malformed"),
        (lambda h, b: ({**h, "X-Fal-Webhook-Signature": "ab" * 10}, b), "malformed"),
        (lambda h, b: ({k: v for k, v in h.items() if "User" not in k}, b), "malformed"),
        (lambda h, b: ({**h, "X-Fal-Webhook-Timestamp": "soon"}, b), "malformed"),
    ],
)
def test_tampered_or_malformed_delivery_is_refused(mutate: Any, code: str) -> None:
    signer = FalSigner()
    jwks, _ = cache_for(signer)
    headers, body = mutate(signer.headers("req-1", BODY), BODY)
    with pytest.raises(WebhookRejected) as refused:
        verify_delivery(headers, body, jwks)
    assert refused.value.code == code


def test_stale_and_future_timestamps_are_refused() -> None:
    signer = FalSigner()
    jwks, _ = cache_for(signer)
    for skew in (-301, 301):
        headers = signer.headers("req-1", BODY, timestamp=int(time.time()) + skew)
        with pytest.raises(WebhookRejected) as refused:
            verify_delivery(headers, BODY, jwks)
        assert refused.value.code == "stale"
    verify_delivery(signer.headers("req-1", BODY, timestamp=int(time.time()) - 200), BODY, jwks)


def test_forged_signature_from_another_key_is_refused_and_keys_are_not_refetched_each_time() -> None:
    fal, forger = FalSigner(), FalSigner()
    jwks, fetches = cache_for(fal)
    verify_delivery(fal.headers("req-1", BODY), BODY, jwks)
    for _ in range(5):
        with pytest.raises(WebhookRejected) as refused:
            verify_delivery(forger.headers("req-1", BODY), BODY, jwks)
        assert refused.value.code == "bad_signature"
    assert fetches[0] == 1  # refetching after a failure waits a minute: forgeries cannot hammer fal


def test_rotated_key_is_fetched_when_a_signature_fails() -> None:
    old, new = FalSigner(), FalSigner()
    published: list[FalSigner] = [old]
    jwks = JwksCache(
        "https://fal.invalid/jwks", fetch=lambda _: {"keys": [k for s in published for k in s.jwks()["keys"]]}
    )
    verify_delivery(old.headers("req-1", BODY), BODY, jwks)
    published[:] = [new]
    jwks._fetched_at -= 120  # the last fetch was two minutes ago
    verify_delivery(new.headers("req-1", BODY), BODY, jwks)


def test_jwks_parsing_skips_what_is_not_an_ed25519_key() -> None:
    assert parse_jwks({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "!!"}, {"kty": "EC"}, "x"]}) == []
    assert parse_jwks("not a document") == []
    assert len(parse_jwks(FalSigner().jwks())) == 1


def test_callback_signature_verifies_with_the_documented_snippet() -> None:
    verify = documented_verifier()
    body = b'{"id":"abc","status":"completed"}'
    header = callbacks.sign("whsec_test", body, int(time.time()))
    assert verify("whsec_test", body, header)
    assert callbacks.verify("whsec_test", body, header)
    assert not verify("whsec_other", body, header)
    assert not verify("whsec_test", body + b" ", header)
    assert not verify("whsec_test", body, header.replace("v1=", "v1=0"))
    assert not verify("whsec_test", body, "garbage")
    old = callbacks.sign("whsec_test", body, int(time.time()) - 600)
    assert not verify("whsec_test", body, old)
    assert not callbacks.verify("whsec_test", body, old)


def test_cached_keys_keep_verifying_while_fals_key_server_is_away() -> None:
    from lipsync.errors import RetryableError

    signer = FalSigner()
    answers: list[object] = [signer.jwks()]

    def fetch(_: str) -> object:
        answer = answers.pop(0) if answers else None
        if answer is None:
            raise RetryableError("down", code="jwks_unavailable")
        return answer

    jwks = JwksCache("https://fal.invalid/jwks", ttl_s=1, fetch=fetch)
    verify_delivery(signer.headers("req-1", BODY), BODY, jwks)
    jwks._fetched_at -= 10  # the keys are past their time to live and the server does not answer
    verify_delivery(signer.headers("req-1", BODY), BODY, jwks)
    with pytest.raises(RetryableError):  # never any keys at all: the delivery waits (503), fal retries
        verify_delivery(signer.headers("req-1", BODY), BODY, JwksCache("https://fal.invalid/jwks", fetch=fetch))
