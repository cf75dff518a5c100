"""Redis addresses for the job store and the broker: a plain Redis URL or a set of Sentinels.

One URL form serves both `LIPSYNC_REDIS_URL` and `LIPSYNC_BROKER_URL`: kombu's own Sentinel
broker URL (each Sentinel a `sentinel://` URL, joined by `;`) plus the master's name as a
query parameter, which kombu itself would take only as a transport option:

    sentinel://[[user]:password@]host1:26379[/db];sentinel://host2:26379;sentinel://host3:26379?master_name=mymaster

The password (and user) in the URL are the Redis master's; a Sentinel with its own password
takes `sentinel_password=...`; `min_other_sentinels=N` is kombu's and redis-py's option of
that name. The db, credentials and options may be written on any one of the addresses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import redis
from redis.sentinel import Sentinel

SENTINEL_SCHEME = "sentinel"
DEFAULT_SENTINEL_PORT = 26379
_PLAIN_SCHEMES = ("redis", "rediss", "unix")
_OPTIONS = ("master_name", "sentinel_password", "min_other_sentinels")


class RedisURLError(ValueError):
    """A Redis or Sentinel URL this system cannot use; the message says what to change."""


@dataclass(frozen=True)
class SentinelAddress:
    """A parsed `sentinel://` URL: where the Sentinels are and which master they watch."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)
    min_other_sentinels: int = 0

    def sentinel_kwargs(self, connection_kwargs: dict[str, Any]) -> dict[str, Any]:
        """Connection options for the Sentinels themselves: the socket timeouts of the data
        connections (redis-py's own default) and the Sentinels' password, if they have one."""
        options = {key: value for key, value in connection_kwargs.items() if key.startswith("socket_")}
        if self.sentinel_password is not None:
            options["password"] = self.sentinel_password
        return options

    def kombu_url(self) -> str:
        """The broker URL kombu's Sentinel transport reads: every address carries the db and the
        credentials, because kombu reads them from whichever address it is connected through."""
        credentials = ""
        if self.password is not None or self.username is not None:
            user = quote(self.username or "", safe="")
            secret = quote(self.password or "", safe="")
            credentials = f"{user}:{secret}@"
        return ";".join(f"sentinel://{credentials}{host}:{port}/{self.db}" for host, port in self.sentinels)


def is_sentinel_url(url: str) -> bool:
    return url.strip().lower().startswith(f"{SENTINEL_SCHEME}://")


def parse_sentinel_url(url: str) -> SentinelAddress:
    """Parse the `sentinel://h1:26379;sentinel://h2:26379/0?master_name=mymaster` form."""
    sentinels: list[tuple[str, int]] = []
    db: int | None = None
    username: str | None = None
    password: str | None = None
    options: dict[str, str] = {}
    for part in url.strip().split(";"):
        part = part.strip()
        if not part:
            continue
        shown = _redacted(part)
        try:
            split = urlsplit(part)
            port = split.port or DEFAULT_SENTINEL_PORT
        except ValueError as exc:
            raise RedisURLError(f"Sentinel address {shown!r} is not a valid URL: {exc}") from None
        if split.scheme.lower() != SENTINEL_SCHEME:
            raise RedisURLError(
                f"Sentinel address {shown!r} must start with sentinel:// (join several with ';', "
                "each one sentinel://host:port)"
            )
        if not split.hostname:
            raise RedisURLError(f"Sentinel address {shown!r} has no host")
        sentinels.append((split.hostname, port))
        if split.username is not None or split.password is not None:
            given = (unquote(split.username) if split.username else None, unquote(split.password or "") or None)
            if (username, password) not in ((None, None), given):
                raise RedisURLError("the Sentinel URL gives two different sets of credentials; give them once")
            username, password = given
        path = split.path.strip("/")
        if path:
            if not path.isdigit():
                raise RedisURLError(f"Sentinel address {shown!r}: the path must be a database number, not {path!r}")
            if db is not None and db != int(path):
                raise RedisURLError("the Sentinel URL names two different database numbers; give it once")
            db = int(path)
        for key, value in parse_qsl(split.query, keep_blank_values=True):
            if key not in _OPTIONS:
                raise RedisURLError(f"unknown option {key!r} in the Sentinel URL; known: {', '.join(_OPTIONS)}")
            if options.get(key, value) != value:
                raise RedisURLError(f"the Sentinel URL gives {key} twice with different values")
            options[key] = value
    if not sentinels:
        raise RedisURLError("the Sentinel URL names no Sentinel: write sentinel://host:26379;sentinel://host2:26379")
    master_name = options.get("master_name", "").strip()
    if not master_name:
        raise RedisURLError(
            "the Sentinel URL has no master name: add ?master_name=<name>, the name in the "
            "Sentinels' `sentinel monitor <name> ...` line"
        )
    min_other = options.get("min_other_sentinels", "0")
    if not min_other.isdigit():
        raise RedisURLError(f"min_other_sentinels must be a whole number, not {min_other!r}")
    return SentinelAddress(
        sentinels=tuple(sentinels),
        master_name=master_name,
        db=db or 0,
        username=username,
        password=password,
        sentinel_password=options.get("sentinel_password") or None,
        min_other_sentinels=int(min_other),
    )


def redis_from_url(url: str, **kwargs: Any) -> redis.Redis[Any]:
    """A Redis client for a plain URL (`redis://`, `rediss://`, `unix://`) or a Sentinel URL.

    For Sentinels the client is `Sentinel(...).master_for(name)`: each new connection asks the
    Sentinels where the master is, so after a failover the same client object reaches the
    promoted replica (a connection to a demoted master is dropped on its first READONLY
    answer). `kwargs` are connection options (socket timeouts, retry, decode_responses...).
    """
    if is_sentinel_url(url):
        address = parse_sentinel_url(url)
        connection_kwargs = dict(kwargs)
        connection_kwargs.setdefault("db", address.db)
        if address.username is not None:
            connection_kwargs.setdefault("username", address.username)
        if address.password is not None:
            connection_kwargs.setdefault("password", address.password)
        sentinel = Sentinel(
            list(address.sentinels),
            min_other_sentinels=address.min_other_sentinels,
            sentinel_kwargs=address.sentinel_kwargs(connection_kwargs),
            **connection_kwargs,
        )
        client: redis.Redis[Any] = sentinel.master_for(address.master_name)
        return client
    scheme = urlsplit(url.strip()).scheme.lower()
    if scheme not in _PLAIN_SCHEMES:
        raise RedisURLError(f"Redis URL {_redacted(url)!r} must start with redis://, rediss://, unix:// or sentinel://")
    return redis.Redis.from_url(url.strip(), **kwargs)


def celery_broker_options(url: str, *, sentinel_transport: str = "sentinel") -> dict[str, Any]:
    """Celery settings that point the broker at `url`: `broker_url`, and for a Sentinel URL also
    `broker_transport_options` (master_name, sentinel_kwargs, min_other_sentinels) and
    `broker_transport`.

    Merge the transport options into the ones Celery already has (visibility_timeout...): they
    are the Sentinel's, not a replacement. `sentinel_transport` is the kombu transport to use, by
    default kombu's own; the workers pass their subclass that keeps the broker fix
    (`workers.broker_sentinel:SentinelTransport`).
    """
    if not is_sentinel_url(url):
        return {"broker_url": url}
    address = parse_sentinel_url(url)
    options: dict[str, Any] = {"master_name": address.master_name}
    if address.sentinel_password is not None:
        options["sentinel_kwargs"] = {"password": address.sentinel_password}
    if address.min_other_sentinels:
        options["min_other_sentinels"] = address.min_other_sentinels
    return {
        "broker_url": address.kombu_url(),
        "broker_transport": sentinel_transport,
        "broker_transport_options": options,
    }


def _redacted(url: str) -> str:
    """The URL without its password, for error messages."""
    try:
        split = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if split.password is None:
        return url
    netloc = split.netloc.replace(f":{split.password}@", ":***@", 1)
    return split._replace(netloc=netloc).geturl()
