"""A local server that speaks fal's queue protocol and does real media work (no lips move)."""
