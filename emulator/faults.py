"""Fault injection: each fault as a rate (0..1) or a one-shot count, set by flag or admin API."""

from __future__ import annotations

import random
from dataclasses import dataclass

FAULTS = (
    "rate_limit", "ingress_5xx", "runner_5xx", "drop_submit", "hang", "model_error",
    "validation_after", "expire_result", "cdn_404", "runner_5xx_created",
    # The request is made and runs, but the submit's answer is held for hang_seconds.
    "hang_answer",
    # A model error that the status does not show: COMPLETED without `error`, the error only on
    # the result fetch (live fal answers some model errors this way).
    "error_on_result_only",
    # The webhook body carries `payload: null` and `payload_error`, as fal's does when the
    # result could not be serialized.
    "webhook_payload_error",
    # The output File's `file_size` differs from the bytes the CDN serves.
    "wrong_file_size",
    # The CDN serves bytes that are not a video (an mp4's `ftyp` box, then garbage) under a video
    # content type; the output File's `file_size` is the size served, so only a probe can tell.
    "bad_output",
)  # fmt: skip


@dataclass
class Fault:
    rate: float = 0.0
    once: int = 0


def parse_spec(name: str, spec: object) -> Fault:
    """`0.2` → 20% of the time; `"once"` → the next time; `"once:3"` → the next three times."""
    if name not in FAULTS:
        raise ValueError(f"unknown fault {name!r}; known: {', '.join(FAULTS)}")
    if isinstance(spec, bool):
        return Fault(rate=1.0 if spec else 0.0)
    if isinstance(spec, int | float):
        if not 0 <= spec <= 1:
            raise ValueError(f"fault {name}: a rate is between 0 and 1")
        return Fault(rate=float(spec))
    text = str(spec).strip().lower()
    if text.startswith("once"):
        count = int(text.partition(":")[2] or 1)
        return Fault(once=count)
    return parse_spec(name, float(text))


class Faults:
    def __init__(self) -> None:
        self.active: dict[str, Fault] = {}
        self.injected: dict[str, int] = {}

    def set(self, name: str, spec: object) -> None:
        self.active[name] = parse_spec(name, spec)

    def clear(self) -> None:
        self.active.clear()

    def fire(self, name: str) -> bool:
        fault = self.active.get(name)
        if fault is None:
            return False
        hit = False
        if fault.once > 0:
            fault.once -= 1
            hit = True
        elif fault.rate > 0 and random.random() < fault.rate:
            hit = True
        if hit:
            self.injected[name] = self.injected.get(name, 0) + 1
        return hit
