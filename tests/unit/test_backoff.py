"""Backoff: exponential from the initial delay to the cap, with jitter."""

from __future__ import annotations

from lipsync.lifecycle import backoff


def test_backoff_grows_exponentially_to_the_cap_with_jitter() -> None:
    for attempt, base in [(1, 1), (2, 2), (3, 4), (5, 16), (6, 30), (40, 30)]:
        samples = [backoff(attempt, 1.0, 30.0) for _ in range(200)]
        assert min(samples) >= base * 0.75 and max(samples) <= base * 1.25
        assert max(samples) - min(samples) > 0  # jittered: workers do not poll in lockstep
