"""`lipsync serve`: its log lines follow LIPSYNC_LOG_JSON, and /metrics counts its requests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from producers.devstack import free_port, stop_process, wait_for_port


def test_serve_logs_json_and_counts_requests_by_route(stack_env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "producers.cli", "serve", "--port", str(port)],
        env={**os.environ, **stack_env, "LIPSYNC_LOG_JSON": "true"},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for_port(port, timeout=60, process=process)
        base = f"http://127.0.0.1:{port}"
        for _ in range(3):
            assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200
        assert httpx.get(f"{base}/v1/jobs/0123456789abcdef0123456789abcdef", timeout=10).status_code in (401, 403)
        metrics = httpx.get(f"{base}/metrics", timeout=10).text
    finally:
        stop_process(process, timeout=20)
    assert 'lipsync_gateway_requests_total{method="GET",route="/healthz",status="200"} 3.0' in metrics, metrics[-2000:]
    assert 'route="/v1/jobs/{job_id}"' in metrics  # the template: job ids never become series
    assert "0123456789abcdef0123456789abcdef" not in metrics
    assert 'lipsync_gateway_request_seconds_count{method="GET",route="/healthz"} 3.0' in metrics
    deadline = time.monotonic() + 5
    while not log.read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert lines, "serve logged nothing"
    for line in lines:
        entry = json.loads(line)  # every line one JSON object, uvicorn's included
        assert {"level", "logger", "message"} <= set(entry)
    assert any(json.loads(line)["logger"].startswith("uvicorn") for line in lines), lines
