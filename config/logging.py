"""Logging: one line per event, JSON when configured, and never a secret.

Secrets are kept out at the source (SecretStr, redacted URLs); the filter here is the last
line of defence for presigned URLs and the fal key should one slip into a message.
"""

from __future__ import annotations

import json
import logging
import re
import time

from config.settings import Settings

# A URL's query string may be a presigned signature: drop it wherever it appears.
_QUERY = re.compile(r"(https?://[^\s?\"']+)\?[^\s\"']*")
_CONFIGURED = False


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
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"))
    handler.addFilter(RedactingFilter([settings.fal_key.get_secret_value()]))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(settings.log_level.upper())
    for noisy in ("botocore", "boto3", "urllib3", "httpx", "httpcore", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
