"""Shared domain and adapters of the lipsync pipeline."""
