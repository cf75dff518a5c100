"""What both baselines do around fal: presign the inputs, and after fal, copy the output video
from fal's CDN into S3 (as the pipeline's store stage does)."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import boto3
import httpx
from botocore.config import Config


def s3_client() -> Any:
    return boto3.client(
        "s3",
        endpoint_url=os.environ["LIPSYNC_S3_ENDPOINT_URL"],
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, signature_version="s3v4", max_pool_connections=64),
    )


def presign(s3: Any, bucket: str, key: str) -> str:
    url: str = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=6 * 3600)
    return url


def copy_output(http: httpx.Client, s3: Any, url: str, bucket: str, key: str) -> int:
    """Stream fal's output to a temp file, then upload it; returns its size."""
    with tempfile.NamedTemporaryFile(suffix=".mp4") as spool:
        with http.stream("GET", url) as response:
            response.raise_for_status()
            for chunk in response.iter_bytes(1 << 20):
                spool.write(chunk)
        spool.flush()
        s3.upload_file(spool.name, bucket, key, ExtraArgs={"ContentType": "video/mp4"})
        return spool.tell()
