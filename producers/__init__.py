"""Producers: the Python API (`producers.api.LipsyncClient`), the `lipsync` CLI and batch manifests."""

from typing import Any


def __getattr__(name: str) -> Any:
    # Lazy, so `lipsync --help` and the test fixtures do not import boto3 and httpx up front.
    if name == "LipsyncClient":
        from producers.api import LipsyncClient

        return LipsyncClient
    raise AttributeError(name)
