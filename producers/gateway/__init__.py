"""The HTTP gateway: tenants, jobs and batches over HTTP, fal webhooks in (see docs/gateway.md)."""

from producers.gateway.app import create_app

__all__ = ["create_app"]
