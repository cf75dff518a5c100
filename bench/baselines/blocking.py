"""Baseline (b): a Celery task that submits to fal and blocks in a poll loop until the result
is ready, as most public examples do (fal-client's submit, `status()` every second), then
copies the output into S3. The task records when it finished in a Redis hash.

Worker: `celery -A bench.baselines.blocking worker -Q bench-blocking --pool threads`.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import fal_client
import httpx
import redis
from celery import Celery

from bench.baselines.common import copy_output, presign, s3_client
from lipsync.sentinel import redis_from_url

APP = "fal-ai/sync-lipsync/v3"
QUEUE = "bench-blocking"
DONE_KEY = "bench:blocking:done"
POLL_INTERVAL_S = 1.0

app = Celery("bench-blocking", broker=os.environ.get("LIPSYNC_BROKER_URL", "redis://localhost:6379/0"))
app.conf.update(task_ignore_result=True, task_acks_late=True, worker_prefetch_multiplier=1, task_default_queue=QUEUE)
_local = threading.local()


def _clients() -> tuple[Any, httpx.Client, redis.Redis[bytes]]:
    if not hasattr(_local, "s3"):
        _local.s3 = s3_client()
        _local.http = httpx.Client(verify=os.environ.get("SSL_CERT_FILE", True), timeout=60)
        _local.redis = redis_from_url(os.environ["LIPSYNC_REDIS_URL"])
    return _local.s3, _local.http, _local.redis


@app.task(name="bench.blocking_lipsync")  # type: ignore[untyped-decorator]
def blocking_lipsync(index: int, queued: float, bucket: str, video_key: str, audio_key: str) -> None:
    s3, http, store = _clients()
    try:
        handle = fal_client.submit(
            APP, arguments={"video_url": presign(s3, bucket, video_key), "audio_url": presign(s3, bucket, audio_key)}
        )
        while not isinstance(handle.status(), fal_client.Completed):
            time.sleep(POLL_INTERVAL_S)
        result = handle.get()
        size = copy_output(http, s3, result["video"]["url"], bucket, f"baseline-blocking/{index}.mp4")
        record: dict[str, Any] = {"queued": queued, "completed": time.time(), "size": size}
    except Exception as exc:  # a baseline failing is a figure too
        record = {"queued": queued, "error": f"{type(exc).__name__}: {exc}"[:300]}
    store.hset(DONE_KEY, str(index), json.dumps(record))
