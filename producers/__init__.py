"""Producers: the Python API, the `lipsync` CLI and batch manifests."""

from producers.api import LipsyncClient

__all__ = ["LipsyncClient"]
