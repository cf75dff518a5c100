"""The one guarded fetcher for URLs that users give us (and for fal's output URLs).

http(s) only; every address the name resolves to must be public; the connection goes to the
address that was checked (no second DNS answer can swap in 127.0.0.1); each redirect is
checked again; size and total time are capped. Named private hosts can be allowed for
development. Messages never carry a URL's query string: presigned URLs are credentials.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import httpx

from config.settings import Settings
from lipsync.errors import InvalidInput, RetryableError, TooLarge, UnsafeURL

Resolver = Callable[[str, int], list[str]]
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_REDIRECTS = {301, 302, 303, 307, 308}


class Writable(Protocol):
    def write(self, chunk: bytes, /) -> int: ...


@dataclass(frozen=True)
class FetchResult:
    size: int
    sha256: str
    content_type: str | None
    final_url: str


def system_resolver(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise InvalidInput(f"the host {host!r} could not be resolved ({exc.strerror})") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def override_resolver(overrides: dict[str, str], fallback: Resolver = system_resolver) -> Resolver:
    """Fixed answers for some names (as curl's --resolve), the system's for the rest."""

    def resolve(host: str, port: int) -> list[str]:
        fixed = overrides.get(host.lower())
        return [fixed] if fixed else fallback(host, port)

    return resolve


def is_public_address(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped or address.sixtofour
        if mapped is not None:
            return is_public_address(str(mapped))
        if address.teredo is not None:
            return False
    if isinstance(address, ipaddress.IPv4Address) and address in _CGNAT:
        return False
    return bool(address.is_global) and not (
        address.is_loopback or address.is_private or address.is_link_local or address.is_multicast
        or address.is_reserved or address.is_unspecified
    )  # fmt: skip


def redact_url(url: str) -> str:
    """The URL without userinfo and query: safe to log and to show."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if _port_or_none(parts) else "")
    query = "?…" if parts.query else ""
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", "")) + query


def _port_or_none(parts: urllib.parse.SplitResult) -> int | None:
    try:
        return parts.port
    except ValueError:
        return None


class GuardedFetcher:
    def __init__(
        self,
        *,
        allowed_private_hosts: frozenset[str] | set[str] = frozenset(),
        max_bytes: int,
        timeout_s: float = 300.0,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 30.0,
        max_redirects: int = 5,
        resolver: Resolver | None = None,
        verify: bool | str = True,
    ) -> None:
        self.allowed = frozenset(h.lower() for h in allowed_private_hosts)
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.max_redirects = max_redirects
        self.resolver = resolver or system_resolver
        self._http = httpx.Client(
            # A silent server is cut off by the read timeout, never later than the total cap.
            timeout=httpx.Timeout(min(read_timeout_s, timeout_s), connect=min(connect_timeout_s, timeout_s)),
            follow_redirects=False,
            verify=verify,
            trust_env=False,  # a proxy from the environment would undo the pinning
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=8),
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> GuardedFetcher:
        """The fetcher producers and workers share: the same allow-list, limits and names."""
        overrides = settings.resolved_hosts()
        return cls(
            allowed_private_hosts=settings.allowed_private_hosts(),
            max_bytes=settings.max_input_bytes,
            timeout_s=settings.fetch_timeout_s,
            resolver=override_resolver(overrides) if overrides else None,
        )

    def close(self) -> None:
        self._http.close()

    def check_url(self, url: str) -> None:
        self._pin(url)

    def _pin(self, url: str) -> tuple[urllib.parse.SplitResult, str]:
        """Check the URL and pick the checked address to connect to."""
        shown = redact_url(url)
        try:
            parts = urllib.parse.urlsplit(url)
        except ValueError:
            raise InvalidInput(f"{shown} is not a valid URL") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise UnsafeURL(f"the URL uses the scheme '{scheme or '(none)'}'; only http(s) URLs are fetched")
        if parts.username is not None or parts.password is not None:
            raise UnsafeURL(f"{shown}: URLs with a user name or password are not accepted")
        host = (parts.hostname or "").lower()
        if not host:
            raise InvalidInput(f"{shown} has no host")
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise InvalidInput(f"{shown} has an invalid port") from None
        allowed = host in self.allowed
        try:
            addresses = [str(ipaddress.ip_address(host))]
        except ValueError:
            addresses = self.resolver(host, port)
        if not addresses:
            raise InvalidInput(f"the host {host!r} resolved to no address")
        for address in addresses:
            if not allowed and address not in self.allowed and not is_public_address(address):
                raise UnsafeURL(
                    f"{shown} points to a private or internal address ({address}); only public addresses are fetched"
                )
        return parts, addresses[0]

    def fetch_to_file(self, url: str, fileobj: Writable) -> FetchResult:
        started = time.monotonic()
        current = url
        for _ in range(self.max_redirects + 1):
            parts, address = self._pin(current)
            host = parts.hostname or ""
            ip_host = f"[{address}]" if ":" in address else address
            netloc = ip_host + (f":{parts.port}" if parts.port else "")
            pinned = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
            headers = {"Host": parts.netloc.rsplit("@", 1)[-1], "Accept-Encoding": "identity"}
            try:
                with self._http.stream("GET", pinned, headers=headers, extensions={"sni_hostname": host}) as response:
                    if response.status_code in _REDIRECTS and "location" in response.headers:
                        current = urllib.parse.urljoin(current, response.headers["location"])
                        continue
                    self._check_status(response, current)
                    return self._stream(response, current, fileobj, started)
            except httpx.TimeoutException:
                raise RetryableError(f"fetching {redact_url(current)} timed out", code="fetch_timeout") from None
            except httpx.TransportError as exc:
                raise RetryableError(
                    f"could not fetch {redact_url(current)}: {type(exc).__name__}", code="fetch_failed"
                ) from None
        raise InvalidInput(f"{redact_url(url)} redirected more than {self.max_redirects} times")

    def _check_status(self, response: httpx.Response, url: str) -> None:
        status = response.status_code
        if status == 200:
            return
        shown = redact_url(url)
        if status == 429 or status >= 500:
            raise RetryableError(f"{shown} answered {status} {response.reason_phrase}", code="fetch_failed")
        raise InvalidInput(f"{shown} answered {status} {response.reason_phrase}")

    def _stream(self, response: httpx.Response, url: str, fileobj: Writable, started: float) -> FetchResult:
        shown = redact_url(url)
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise TooLarge(f"{shown} is {declared} bytes, over the limit of {self.max_bytes} bytes")
        digest, size = hashlib.sha256(), 0
        # No chunk size: httpx would gather a whole chunk before yielding, so a server that
        # trickles bytes would never reach the time check below (the hostile suite found it).
        for chunk in response.iter_raw():
            size += len(chunk)
            if size > self.max_bytes:
                raise TooLarge(f"{shown} sent more than the limit of {self.max_bytes} bytes")
            if time.monotonic() - started > self.timeout_s:
                raise InvalidInput(
                    f"{shown} did not finish sending within {self.timeout_s:.0f} s", code="fetch_too_slow"
                )
            digest.update(chunk)
            fileobj.write(chunk)
        return FetchResult(size, digest.hexdigest(), response.headers.get("content-type"), url)
