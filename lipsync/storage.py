"""S3 storage (boto3): staging inputs, storing outputs, presigning, with S3's failures mapped
once onto the error tree (retry or give up, in words; never a credential in a message)."""

from __future__ import annotations

import os
import re
from typing import Any, BinaryIO, Protocol

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from config.settings import Settings
from lipsync.errors import InvalidInput, PermanentError, RetryableError, TooLarge

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_RETRYABLE_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
    "InternalError", "ServiceUnavailable", "503", "500", "502", "504",
}  # fmt: skip
_CHUNK = 1024 * 1024


class Writable(Protocol):
    def write(self, chunk: bytes, /) -> int: ...


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/key` → (bucket, key), or a readable InvalidInput."""
    if not uri.startswith("s3://"):
        raise InvalidInput(f"{uri[:80]!r} is not an s3:// URI")
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise InvalidInput(f"the S3 URI {uri[:80]!r} names no bucket; expected s3://bucket/key")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise InvalidInput(
            f"the S3 URI {uri[:80]!r} has an invalid bucket name {bucket[:64]!r} (3-63 lowercase "
            "letters, digits, dots and hyphens)"
        )
    if not key or key.endswith("/"):
        raise InvalidInput(f"the S3 URI {uri[:80]!r} names no object; expected s3://bucket/key")
    if len(key.encode()) > 1024 or any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise InvalidInput(f"the S3 URI {uri[:80]!r} has an invalid key (too long or control characters)")
    return bucket, key


class Storage:
    def __init__(
        self, settings: Settings, *, connect_timeout_s: float = 5, read_timeout_s: float = 60, max_attempts: int = 5
    ) -> None:
        self.settings = settings
        self.bucket = settings.s3_bucket
        self.client: Any = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url or None,
            region_name=settings.s3_region,
            config=Config(
                retries={"max_attempts": max_attempts, "mode": "standard"},
                connect_timeout=connect_timeout_s,
                read_timeout=read_timeout_s,
                max_pool_connections=max(10, settings.transfer_concurrency * 4),
                s3={"addressing_style": "path"} if settings.s3_endpoint_url else None,
                signature_version="s3v4",
                # Our calls are built here, from our settings and from s3:// URIs `parse_s3_uri` has
                # checked: botocore's check of every parameter against the S3 model cost ~0.3 ms of
                # CPU per call. Bucket names are still checked, the server refuses a bad request,
                # and checksums stay on.
                parameter_validation=False,
            ),
        )
        # Multipart from disk in 16 MB parts: memory stays flat whatever the file size.
        self.transfer = TransferConfig(
            multipart_threshold=16 * _CHUNK, multipart_chunksize=16 * _CHUNK,
            max_concurrency=4, use_threads=True,
        )  # fmt: skip

    def uri(self, key: str, bucket: str | None = None) -> str:
        return f"s3://{bucket or self.bucket}/{key}"

    def ensure_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if _code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                raise self._error(exc, self.uri("")) from None
        except BotoCoreError as exc:
            raise self._error(exc, self.uri("")) from None
        arguments: dict[str, Any] = {"Bucket": self.bucket}
        if self.settings.s3_region != "us-east-1":
            arguments["CreateBucketConfiguration"] = {"LocationConstraint": self.settings.s3_region}
        try:
            self.client.create_bucket(**arguments)
        except ClientError as exc:
            if _code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise self._error(exc, self.uri("")) from None

    def upload_file(self, path: str, key: str, *, content_type: str, metadata: dict[str, str] | None = None) -> None:
        extra = {"ContentType": content_type, "Metadata": metadata or {}}
        try:
            if os.path.getsize(path) < self.transfer.multipart_threshold:
                # One PUT from the open file: s3transfer's manager (a thread pool per call) costs
                # more CPU than the upload itself for the small files most jobs move.
                with open(path, "rb") as body:
                    self.client.put_object(Bucket=self.bucket, Key=key, Body=body, **extra)
                return
            self.client.upload_file(path, self.bucket, key, ExtraArgs=extra, Config=self.transfer)
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, self.uri(key), ours=True) from None

    def upload_fileobj(
        self, fileobj: BinaryIO, key: str, *, content_type: str, metadata: dict[str, str] | None = None
    ) -> None:
        extra = {"ContentType": content_type, "Metadata": metadata or {}}
        try:
            self.client.upload_fileobj(fileobj, self.bucket, key, ExtraArgs=extra, Config=self.transfer)
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, self.uri(key), ours=True) from None

    def head(self, key: str, bucket: str | None = None) -> dict[str, Any] | None:
        bucket = bucket or self.bucket
        try:
            found: dict[str, Any] = self.client.head_object(Bucket=bucket, Key=key)
            return found
        except ClientError as exc:
            if _code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._error(exc, self.uri(key, bucket)) from None
        except BotoCoreError as exc:
            raise self._error(exc, self.uri(key, bucket)) from None

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def download_to_file(self, bucket: str, key: str, fileobj: Writable, *, max_bytes: int) -> int:
        """Stream an object into `fileobj` in chunks; the size cap is checked before reading.

        One GET, no HEAD first: the GET's own Content-Length gives the size before the body is
        read (a HEAD per input was a third of the stage's S3 calls, and of its CPU)."""
        where = self.uri(key, bucket)
        written = 0
        try:
            found = self.client.get_object(Bucket=bucket, Key=key)
            body = found["Body"]
            if int(found.get("ContentLength", 0)) > max_bytes:
                body.close()
                raise TooLarge(f"{where} is {found['ContentLength']} bytes, over the limit of {max_bytes} bytes")
            for chunk in body.iter_chunks(_CHUNK):
                written += len(chunk)
                if written > max_bytes:
                    raise TooLarge(f"{where} is over the limit of {max_bytes} bytes")
                fileobj.write(chunk)
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, where) from None
        return written

    def presign_get(self, key: str, ttl_s: int, bucket: str | None = None) -> str:
        url: str = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket or self.bucket, "Key": key}, ExpiresIn=int(ttl_s)
        )
        return url

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, self.uri(key), ours=True) from None

    @staticmethod
    def _error(exc: Exception, where: str, ours: bool = False) -> Exception:
        if isinstance(exc, BotoConnectionError | BotoCoreError) and not isinstance(exc, ClientError):
            return RetryableError(
                f"S3 unavailable while accessing {where}: {type(exc).__name__}", code="s3_unavailable"
            )
        code = _code(exc)
        if code in _RETRYABLE_CODES:
            return RetryableError(f"S3 answered {code} for {where}; will try again", code="s3_unavailable")
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            message = f"access denied to {where}"
            return PermanentError(message, code="s3_access_denied") if ours else InvalidInput(message)
        if code in ("NoSuchBucket",):
            message = f"the bucket of {where} does not exist"
            return PermanentError(message, code="s3_no_bucket") if ours else InvalidInput(message)
        if code in ("404", "NoSuchKey", "NotFound"):
            return InvalidInput(f"{where} does not exist")
        return PermanentError(f"S3 refused {where}: {code}", code="s3_error")


def _code(exc: Exception) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", "")) or str(
            exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
        )
    return type(exc).__name__
