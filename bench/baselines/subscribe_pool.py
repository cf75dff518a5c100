"""Baseline (a): a thread pool calling the official fal-client's `subscribe`, one call per job,
as its README shows; then the output is copied into S3.

Run as `python -m bench.baselines.subscribe_pool SPEC OUT` with FAL_QUEUE_RUN_HOST,
SSL_CERT_FILE and FAL_KEY pointing at the TLS emulator (set before fal_client is imported).
"""

from __future__ import annotations

import json
import resource
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fal_client
import httpx

from bench.baselines.common import copy_output, presign, s3_client

APP = "fal-ai/sync-lipsync/v3"


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path) as handle:
        spec = json.load(handle)
    bucket = spec["bucket"]
    s3 = s3_client()
    local = threading.local()

    def http() -> httpx.Client:
        if not hasattr(local, "client"):
            local.client = httpx.Client(verify=spec["cert"], timeout=60)
        return local.client  # type: ignore[no-any-return]

    def one(index: int) -> dict[str, Any]:
        # Every job is handed to the pool at `started`: its wait for a free thread is latency too,
        # as a pipeline job's wait for a worker is.
        queued = started
        try:
            result = fal_client.subscribe(
                APP,
                arguments={
                    "video_url": presign(s3, bucket, spec["video_key"]),
                    "audio_url": presign(s3, bucket, spec["audio_key"]),
                },
            )
            size = copy_output(http(), s3, result["video"]["url"], bucket, f"baseline-subscribe/{index}.mp4")
            return {"queued": queued, "completed": time.time(), "size": size}
        except Exception as exc:  # a baseline failing is a figure too
            return {"queued": queued, "error": f"{type(exc).__name__}: {exc}"[:300]}

    def cpu_now() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
        return usage.ru_utime + usage.ru_stime

    cpu_before = cpu_now()  # imports and interpreter start are not per-job work
    started = time.time()
    with ThreadPoolExecutor(max_workers=spec["width"]) as pool:
        jobs = list(pool.map(one, range(spec["jobs"])))
    with open(out_path, "w") as handle:
        json.dump({"started": started, "finished": time.time(), "cpu_s": cpu_now() - cpu_before, "jobs": jobs}, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
