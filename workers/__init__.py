"""Celery workers: the app, thin task wrappers, and one module per pipeline stage."""
