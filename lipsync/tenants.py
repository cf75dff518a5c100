"""Tenants of the HTTP gateway: one API key each (stored only as its SHA-256), and the secret
that signs the callbacks they receive.

The API key is 256 random bits, so a plain SHA-256 of it cannot be brute-forced and can be
looked up directly; a slow password hash (bcrypt, argon2) would only slow every request. The
callback secret must be kept as it is (HMAC needs it to sign); it is never shown after
`lipsync tenants add` / `rotate` and never leaves Redis except as a signature.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

import redis
from pydantic import SecretStr

from lipsync.errors import InvalidInput, LipsyncError

KEY_PREFIX = "lsk_"
SECRET_PREFIX = "whsec_"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class TenantNotFound(LipsyncError):
    code = "tenant_not_found"


@dataclass(frozen=True)
class Tenant:
    name: str
    key_id: str  # the first characters of the key's hash: enough to tell keys apart in a list
    callback_secret: SecretStr
    created_at: float
    revoked_at: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True)
class Credentials:
    """What `add` and `rotate` hand out, once."""

    tenant: Tenant
    api_key: SecretStr


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


class TenantStore:
    def __init__(self, client: redis.Redis[bytes], prefix: str = "lipsync") -> None:
        self.redis = client
        self.prefix = prefix

    def _tenant_key(self, name: str) -> str:
        return f"{self.prefix}:tenant:{name}"

    def _apikey_key(self, digest: str) -> str:
        return f"{self.prefix}:apikey:{digest}"

    @property
    def _names_key(self) -> str:
        return f"{self.prefix}:tenants"

    def add(self, name: str) -> Credentials:
        if not _NAME.match(name):
            raise InvalidInput(f"tenant name {name!r} is not valid: use 1 to 63 lowercase letters, digits, '-' or '_'")
        if not self.redis.hsetnx(self._tenant_key(name), "name", name):
            raise InvalidInput(f"tenant {name!r} already exists; `rotate` gives it a new key")
        self.redis.sadd(self._names_key, name)
        self.redis.hset(
            self._tenant_key(name),
            mapping={"callback_secret": SECRET_PREFIX + secrets.token_urlsafe(32), "created_at": repr(time.time())},
        )
        return self._issue_key(name)

    def rotate(self, name: str) -> Credentials:
        """A new API key; the old one stops working at once. The callback secret is kept."""
        self.get(name)
        return self._issue_key(name)

    def revoke(self, name: str) -> Tenant:
        self.get(name)
        old = self.redis.hget(self._tenant_key(name), "key_hash")
        pipe = self.redis.pipeline()
        if old is not None:
            pipe.delete(self._apikey_key(old.decode()))
        pipe.hdel(self._tenant_key(name), "key_hash")
        pipe.hset(self._tenant_key(name), "revoked_at", repr(time.time()))
        pipe.execute()
        return self.get(name)

    def _issue_key(self, name: str) -> Credentials:
        api_key = KEY_PREFIX + secrets.token_urlsafe(32)
        digest = hash_key(api_key)
        old = self.redis.hget(self._tenant_key(name), "key_hash")
        pipe = self.redis.pipeline()
        if old is not None:
            pipe.delete(self._apikey_key(old.decode()))
        pipe.set(self._apikey_key(digest), name)
        pipe.hset(self._tenant_key(name), "key_hash", digest)
        pipe.hdel(self._tenant_key(name), "revoked_at")
        pipe.execute()
        return Credentials(self.get(name), SecretStr(api_key))

    def get(self, name: str) -> Tenant:
        raw = self.redis.hgetall(self._tenant_key(name))
        if not raw or b"callback_secret" not in raw:
            raise TenantNotFound(f"no tenant named {name!r}")
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        revoked = fields.get("revoked_at")
        return Tenant(
            name=fields["name"],
            key_id=fields.get("key_hash", "")[:12],
            callback_secret=SecretStr(fields["callback_secret"]),
            created_at=float(fields["created_at"]),
            revoked_at=float(revoked) if revoked else None,
        )

    def all(self) -> list[Tenant]:
        names = sorted(n.decode() for n in self.redis.smembers(self._names_key))
        return [self.get(name) for name in names]

    def authenticate(self, api_key: str) -> Tenant | None:
        """The tenant whose active key this is, or None."""
        if not api_key.startswith(KEY_PREFIX) or len(api_key) > 200:
            return None
        digest = hash_key(api_key)
        name = self.redis.get(self._apikey_key(digest))
        if name is None:
            return None
        tenant = self.get(name.decode())
        stored = self.redis.hget(self._tenant_key(tenant.name), "key_hash")
        # Constant-time compare, although the lookup by digest already matched.
        if stored is None or not hmac.compare_digest(stored.decode(), digest) or not tenant.active:
            return None
        return tenant
