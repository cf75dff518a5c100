"""Misconfiguration found before time or money is spent, each said in one line.

Used by the worker at start (`workers.preflight`, which refuses to start) and by the
producer before its first upload (`producers.api`).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from config.settings import Settings
from lipsync.storage import Storage

# Hosts of the real fal: a request to them without a key is refused (401) and, worse, a lost
# answer would be blamed on fal. The emulator and any other URL may run without a key.
FAL_DOMAINS = ("fal.run", "fal.ai", "fal.media")


def talks_to_real_fal(settings: Settings) -> bool:
    host = (urlsplit(settings.fal_queue_url).hostname or "").lower()
    return any(host == domain or host.endswith("." + domain) for domain in FAL_DOMAINS)


def fal_key_problem(settings: Settings) -> str | None:
    """Why the fal settings cannot work, or None."""
    if talks_to_real_fal(settings) and not settings.fal_key.get_secret_value().strip():
        return (
            f"FAL_KEY is not set, and LIPSYNC_FAL_QUEUE_URL is the real fal ({settings.fal_queue_url}): "
            "every submit would be refused; set FAL_KEY (or point LIPSYNC_FAL_QUEUE_URL at the emulator)"
        )
    return None


def bucket_problem(storage: Storage) -> str | None:
    """Why the staging/output bucket cannot be used, or None (also when S3 cannot be asked now)."""
    where = storage.settings.s3_endpoint_url or f"AWS S3 ({storage.settings.s3_region})"
    try:
        storage.client.head_bucket(Bucket=storage.bucket)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", "")) or str(
            exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
        )
        if code in ("404", "NoSuchBucket", "NotFound"):
            return (
                f"the bucket {storage.bucket!r} does not exist at {where}; "
                "create it or set LIPSYNC_S3_BUCKET to one that does"
            )
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return f"access to the bucket {storage.bucket!r} at {where} is denied ({code}); check the S3 credentials"
        return None
    except NoCredentialsError:
        return (
            f"no S3 credentials were found for the bucket {storage.bucket!r} at {where}: set AWS_ACCESS_KEY_ID "
            "and AWS_SECRET_ACCESS_KEY (or a profile), or run `lipsync dev up` for the local stack"
        )
    except BotoCoreError:  # S3 not reachable right now: the stages retry; nothing to decide here
        return None
    return None
