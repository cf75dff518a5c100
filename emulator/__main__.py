"""`python -m emulator` / `lipsync emulator`: run the local fal queue server."""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import uvicorn

from emulator.app import Config, Emulator, build_app, default_data_dir, parse_latency
from emulator.faults import FAULTS, Faults


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(
        prog="lipsync emulator",
        description="A local server speaking fal's queue protocol for fal-ai/sync-lipsync/v3. "
        "It aligns and muxes the media as sync-3 would, but does not move lips.",
    )
    cli.add_argument("--host", default="127.0.0.1")
    cli.add_argument("--port", type=int, default=8080)
    cli.add_argument("--latency", default="0", help="model latency in seconds: '2' or a range '1-3'")
    cli.add_argument(
        "--concurrency",
        type=int,
        default=10,
        help="requests IN_PROGRESS at once per fal key, as fal's account limit (2-40 by plan); the rest wait "
        "IN_QUEUE, FIFO, low priority after normal; 0 = no limit",
    )
    cli.add_argument(
        "--locked",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="start with the account locked: every submit answers fal's 403 'Exhausted balance' for this long "
        "(POST /_admin/account/lock|unlock at run time)",
    )
    cli.add_argument(
        "--revoked-keys", default="", help="comma-separated keys that answer 401, as a revoked fal key does"
    )
    cli.add_argument(
        "--listing-finished-only",
        action="store_true",
        help="GET /v1/models/requests/by-endpoint lists only ended requests (fal's docs do not say which)",
    )
    cli.add_argument(
        "--media-mode",
        choices=("encode", "copy"),
        default="encode",
        help="copy: stream-copy the video where the inputs allow (for benchmarks)",
    )
    cli.add_argument("--retention", type=float, default=3600.0, help="result retention, s")
    cli.add_argument("--retention-large", type=float, default=360.0, help="retention of results of 10 KB or more, s")
    cli.add_argument("--cdn-ttl", type=float, default=3600.0, help="how long output files are served, s")
    cli.add_argument("--hang-seconds", type=float, default=60.0, help="how long a 'hang' fault hangs")
    cli.add_argument("--keys", default="", help="comma-separated accepted keys; empty = any non-empty key")
    cli.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="NAME=SPEC",
        help=f"inject a fault: a rate (0.2) or once[:N]; names: {', '.join(FAULTS)}",
    )
    cli.add_argument("--data-dir", type=Path, default=None, help="where outputs are kept")
    cli.add_argument(
        "--tls", action="store_true", help="serve https with a generated certificate (its path is printed)"
    )
    cli.add_argument("--log-level", default="warning")
    return cli


def main(argv: Sequence[str] | None = None) -> None:
    options = parser().parse_args(argv)
    try:
        config = Config(
            latency=parse_latency(options.latency),
            concurrency=max(0, options.concurrency),
            media_mode=options.media_mode,
            retention=options.retention,
            retention_large=options.retention_large,
            cdn_ttl=options.cdn_ttl,
            keys=frozenset(k for k in options.keys.split(",") if k),
            hang_seconds=options.hang_seconds,
            listing_unfinished=not options.listing_finished_only,
        )
        faults = Faults()
        for item in options.fault:
            name, _, spec = item.partition("=")
            faults.set(name.strip(), spec.strip() or "1")
    except ValueError as exc:
        sys.exit(f"lipsync emulator: {exc}")
    data_dir = options.data_dir or default_data_dir()
    data_dir.mkdir(parents=True, exist_ok=True)
    ssl: dict[str, str] = {}
    if options.tls:
        from emulator.tls import make_certificate

        cert, key = make_certificate(data_dir / "tls")
        ssl = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
        print(f"emulator certificate: {cert}", flush=True)
    logging.basicConfig(level=options.log_level.upper())
    emulator = Emulator(config, faults, data_dir)
    if options.locked > 0:
        emulator.waiting.lock(options.locked)
    emulator.waiting.revoked.update(k for k in options.revoked_keys.split(",") if k)
    app = build_app(emulator)
    # uvicorn handles SIGTERM itself, then raises it again once stopped; with the default
    # handler that would end the process before the `finally` below removed the data folder.
    signal.signal(signal.SIGTERM, _exit_quietly)
    try:
        uvicorn.run(
            app, host=options.host, port=options.port, log_level=options.log_level,
            access_log=False, timeout_keep_alive=30, **ssl,  # type: ignore[arg-type]
        )  # fmt: skip
    finally:
        if options.data_dir is None:  # a folder of our own making: outputs go with the server
            shutil.rmtree(data_dir, ignore_errors=True)


def _exit_quietly(signum: int, _frame: object) -> None:
    sys.exit(128 + signum)


if __name__ == "__main__":
    main()
