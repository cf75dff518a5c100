"""Benchmarks of the pipeline against the physical limit and against what users write instead.

`python -m bench` starts its own stack (Redis, an S3 server, the fal emulator, workers), runs
the scenarios and writes `bench/results/<date>.{json,md}` with PNG plots; see bench/README.md.
"""
