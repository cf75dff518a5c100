"""A stack for hostile input: the session's Redis (its own database), S3 and emulator, with a
worker and a producer of its own whose allow-list names only `localhost`.

So 127.0.0.1, ::1 and every other private address are refused as they would be in
production, while the emulator (reached as `localhost`) and the hostile web server's first
hop (`localhost` too) stay reachable: a redirect from there to 127.0.0.1, the metadata
address or a private range must be refused by the worker's fetcher. Names that look public
are pinned to internal addresses with LIPSYNC_RESOLVE_OVERRIDES, which the guard checks
like any DNS answer.
"""

from __future__ import annotations

import os
import random
import struct
import threading
import time
import urllib.parse
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from producers.devstack import WorkerSpec, free_port, spawn_worker
from tests.fixtures.isolated import aws_env, kill_group, settings_from

MAX_INPUT_BYTES = 2_000_000
BUCKET = "lipsync-hostile"
# Public-looking names that answer with internal addresses (a DNS rebinding, a poisoned zone).
RESOLVE = {
    "media.example.com": "127.0.0.1",
    "cdn.example.net": "169.254.169.254",
    "assets.example.org": "10.1.2.3",
}


class HostileHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    files: dict[str, tuple[bytes, str]] = {}

    def log_message(self, *args: Any) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        parts = url.path.strip("/").split("/")
        route = parts[0]
        if route == "redirect":
            self._redirect(query["to"])
        elif route == "loop":
            self._redirect(f"/loop/{int(parts[1]) + 1}")
        elif route == "file":
            body, content_type = self.files[parts[1]]
            self._send(body, content_type)
        elif route == "big":  # honest: says it is over the cap
            self.send_response(200)
            self.send_header("Content-Length", str(MAX_INPUT_BYTES * 3))
            self.end_headers()
            self._write_for(MAX_INPUT_BYTES * 3)
        elif route == "chunked-big":  # no length given; sends past the cap
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"\0" * 65536
            for _ in range(MAX_INPUT_BYTES * 2 // len(chunk)):
                if not self._chunk(chunk):
                    return
            self._chunk(b"")
        elif route == "short":  # lies: promises 1 MB, sends 10 KB and hangs up
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            self.wfile.write(b"\0" * 10_000)
            self.wfile.flush()
            self.close_connection = True
        elif route == "trickle":  # a byte every 0.2 s, for a minute at most
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and self._chunk(b"\0"):
                time.sleep(0.2)
        elif route == "empty":
            self._send(b"", "video/mp4")
        else:
            self._send(b"not found", "text/plain", status=404)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send(self, body: bytes, content_type: str, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _chunk(self, data: bytes) -> bool:
        try:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
            return True
        except OSError:
            return False

    def _write_for(self, size: int) -> None:
        chunk = b"\0" * 65536
        try:
            for _ in range(size // len(chunk)):
                self.wfile.write(chunk)
        except OSError:
            pass


@dataclass
class HostileStack:
    env: dict[str, str]
    client: Any
    emulator: Any
    web_port: int
    logdir: Path

    def web(self, path: str, host: str = "localhost") -> str:
        return f"http://{host}:{self.web_port}/{path.lstrip('/')}"

    def serve(self, name: str, body: bytes, content_type: str = "video/mp4") -> str:
        HostileHandler.files[name] = (body, content_type)
        return self.web(f"file/{name}")


def _wait_ready(log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and " ready." in log.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise TimeoutError(f"the hostile-input worker did not start; see {log}")


@pytest.fixture(scope="package")
def hostile(
    redis_server: Any, s3_server: Any, emulator: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HostileStack]:
    from producers.api import LipsyncClient

    logdir = tmp_path_factory.mktemp("hostile-logs")
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), HostileHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    redis_url = redis_server.url.rsplit("/", 1)[0] + "/3"
    env = {
        **s3_server.env(),
        "LIPSYNC_S3_BUCKET": BUCKET,
        "LIPSYNC_REDIS_URL": redis_url,
        "LIPSYNC_BROKER_URL": redis_url,
        "LIPSYNC_KEY_PREFIX": "hostile",
        "LIPSYNC_FAL_QUEUE_URL": f"http://localhost:{emulator.port}",
        "FAL_KEY": "hostile-suite-fal-key",
        "LIPSYNC_ALLOW_PRIVATE_URLS": "localhost",
        "LIPSYNC_RESOLVE_OVERRIDES": ",".join(f"{host}={ip}" for host, ip in RESOLVE.items()),
        "LIPSYNC_MAX_INPUT_BYTES": str(MAX_INPUT_BYTES),
        "LIPSYNC_MAX_DURATION_S": "4",
        "LIPSYNC_MAX_WIDTH": "640",
        "LIPSYNC_MAX_HEIGHT": "640",
        "LIPSYNC_FETCH_TIMEOUT_S": "3",
        "LIPSYNC_MAX_RETRIES": "2",
        "LIPSYNC_RETRY_BASE_S": "0.2",
        "LIPSYNC_RETRY_MAX_S": "0.5",
        "LIPSYNC_POLL_INITIAL_S": "0.3",
        "LIPSYNC_POLL_MAX_S": "1",
        "LIPSYNC_DISPATCH_INTERVAL_S": "0.1",
        "LIPSYNC_SUBMITS_PER_SECOND": "200",
    }
    log = logdir / "worker-hostile.log"
    worker = spawn_worker(WorkerSpec("transfer,api", "threads", 6, "hostile"), env, log=log.open("ab"))
    client = None
    try:
        with aws_env(env):
            client = LipsyncClient(settings_from(env))
            client.storage.ensure_bucket()
            client.redis.flushdb()
            _wait_ready(log)
            yield HostileStack(env, client, emulator, server.server_address[1], logdir)
    finally:
        kill_group(worker)
        server.shutdown()
        if client is not None:
            client.close()


# media, broken on purpose ---------------------------------------------------------------
def png_bytes(width: int = 64, height: int = 48) -> bytes:
    """A real PNG image (grey), written by hand: no imaging library needed."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\0" + b"\x80" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


@pytest.fixture(scope="package")
def bad_media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from lipsync.samples import make_audio, make_video

    folder = tmp_path_factory.mktemp("hostile-media")
    made = {
        "video": make_video(str(folder / "good.mp4"), 1.2, width=160, height=120),
        "audio": make_audio(str(folder / "good.wav"), 1.0),
        "video_5s": make_video(str(folder / "five-seconds.mp4"), 5.0, width=160, height=120),
        "audio_5s": make_audio(str(folder / "five-seconds.wav"), 5.0),
        "video_720p": make_video(str(folder / "wide.mp4"), 0.4, width=1280, height=720),
        "audio_in_mp4": make_audio(str(folder / "audio-only.mp4"), 1.0),
    }
    good = Path(made["video"]).read_bytes()
    rng = random.Random(7)
    raw = {
        "text.mp4": b"this is not a video, only text wearing a video's name\n" * 40,
        "image.mp4": png_bytes(),
        "random.mp4": bytes(rng.getrandbits(8) for _ in range(40_000)),
        "truncated.mp4": good[: len(good) // 2],
        "empty.mp4": b"",
        "oversized.mp4": b"\0" * (MAX_INPUT_BYTES + 1),
    }
    for name, body in raw.items():
        (folder / name).write_bytes(body)
        made[name] = str(folder / name)
    made["unicode"] = str(folder / "ünïcødé 名前 ..%2F;rm -rf.mp4")
    Path(made["unicode"]).write_bytes(good)
    (folder / "sub").mkdir()
    made["traversal"] = str(folder / "sub" / ".." / "sub" / ".." / "good.mp4")
    os.sync()
    return made
