"""Configuration: one settings class, the Celery configuration and logging."""

from config.settings import Settings, get_settings

__all__ = ["Settings", "get_settings"]
