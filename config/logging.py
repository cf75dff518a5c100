"""Logging: one line per event, JSON when configured, and never a secret.

Secrets are kept out at the source (SecretStr, redacted URLs); the filter here is the last
line of defence for presigned URLs and the fal key should one slip into a message.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from config.settings import Settings

# A URL's query string may be a presigned signature: drop it wherever it appears.
_QUERY = re.compile(r"(https?://[^\s?\"']+)\?[^\s\"']*")
_CONFIGURED = False
# The job (and its fal request) a worker is busy with: put on every line logged meanwhile.
_JOB_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)
_REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


@contextmanager
def job_log_context(job_id: str) -> Iterator[None]:
    """Lines logged inside carry `job_id` (and `request_id` once `bind_request_id` knows it)."""
    job_token, request_token = _JOB_ID.set(job_id), _REQUEST_ID.set(None)
    try:
        yield
    finally:
        _JOB_ID.reset(job_token)
        _REQUEST_ID.reset(request_token)


def bind_request_id(job_id: str, request_id: str) -> None:
    if _JOB_ID.get() == job_id:
        _REQUEST_ID.set(request_id)


# Celery's own "Task lipsync.stage[<task id>] received/succeeded" lines name the task, not the
# job: the job id is the task's only argument, which Celery passes along in the record's args.
_JOB_ID_IN_ARGS = re.compile(r"\b([0-9a-f]{32})\b")


class JobContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "job_id", None) is None:
            record.job_id = _JOB_ID.get() or _celery_task_job_id(record)
        if getattr(record, "request_id", None) is None:
            record.request_id = _REQUEST_ID.get()
        return True


def _celery_task_job_id(record: logging.LogRecord) -> str | None:
    if not record.name.startswith("celery.") or not isinstance(record.args, dict):
        return None
    found = _JOB_ID_IN_ARGS.search(str(record.args.get("args", "")))
    return found.group(1) if found else None


class TextFormatter(logging.Formatter):
    """The plain format, with the job's ids appended when known."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = [f"{name}={value}" for name in ("job_id", "request_id") if (value := getattr(record, name, None))]
        return f"{line} [{' '.join(ids)}]" if ids else line


class RedactingFilter(logging.Filter):
    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if len(s) >= 6]

    def filter(self, record: logging.LogRecord) -> bool:
        message = redact(record.getMessage(), self.secrets)
        record.msg, record.args = message, None
        return True


def redact(text: str, secrets: list[str]) -> str:
    text = _QUERY.sub(r"\1?…", text)
    for secret in secrets:
        text = text.replace(secret, "[redacted]")
    return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in ("job_id", "request_id", "stage"):
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(settings: Settings) -> None:
    global _CONFIGURED
    if _CONFIGURED:
        return
    _CONFIGURED = True
    handler = logging.StreamHandler()
    if settings.log_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"))
    handler.addFilter(JobContextFilter())  # first: it reads the record's args, which redaction folds in
    handler.addFilter(RedactingFilter([settings.fal_key.get_secret_value()]))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(settings.log_level.upper())
    for noisy in ("botocore", "boto3", "urllib3", "httpx", "httpcore", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Python warnings (Celery's SecurityWarning, deprecations) as log lines too: one format.
    logging.captureWarnings(True)
    # uvicorn's loggers carry their own handlers; through the root they get this one format.
    for server in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(server).handlers = []
        logging.getLogger(server).propagate = True


def _on_celeryd_init(instance: Any = None, **_: Any) -> None:
    """Before a worker prints anything: set up logging, and in JSON mode no banner on stdout."""
    from config.settings import get_settings

    settings = get_settings()
    configure_logging(settings)
    if settings.log_json and instance is not None:
        instance.quiet = True


def _connect_to_celery() -> None:
    try:
        from celery.signals import celeryd_init
    except ImportError:  # a producer-only install
        return
    celeryd_init.connect(_on_celeryd_init, weak=False)


_connect_to_celery()
