"""Log lines: one JSON object per event when configured, carrying the job and fal request ids of
the work in progress, and never the fal key or a presigned URL's signature."""

from __future__ import annotations

import io
import json
import logging

from config.logging import (
    JobContextFilter,
    JsonFormatter,
    RedactingFilter,
    TextFormatter,
    bind_request_id,
    job_log_context,
)

KEY = "fal-key-0123456789abcdef"


def logger_into(stream: io.StringIO, formatter: logging.Formatter) -> logging.Logger:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(RedactingFilter([KEY]))
    handler.addFilter(JobContextFilter())
    logger = logging.getLogger(f"test.{id(stream)}")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


def test_json_lines_carry_the_job_and_request_ids_once_known_and_never_the_key() -> None:
    stream = io.StringIO()
    log = logger_into(stream, JsonFormatter())
    with job_log_context("job-1"):
        log.info("staging")
        bind_request_id("job-1", "req-9")
        log.warning("fal said 500 with key %s at https://s3.example/out.mp4?X-Amz-Signature=abc", KEY)
    log.info("idle")
    first, second, third = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["job_id"] == "job-1" and "request_id" not in first
    assert second["job_id"] == "job-1" and second["request_id"] == "req-9" and second["level"] == "warning"
    assert KEY not in second["message"] and "X-Amz-Signature" not in second["message"]
    assert "job_id" not in third


def test_a_request_id_is_bound_only_to_its_own_job() -> None:
    stream = io.StringIO()
    log = logger_into(stream, TextFormatter("%(message)s"))
    with job_log_context("job-1"):
        bind_request_id("job-2", "req-of-another-job")
        log.info("polling")
    assert stream.getvalue().strip() == "polling [job_id=job-1]"
