"""Admission to fal, shared by every worker through Redis: a cap on jobs in flight and a submit rate.

One Lua script (`lua/admit.lua`) decides both, so two workers can never both take the last
slot. A slot is part of the job's state: it is taken here, by the submit step, and given back
by the job store's one write (`lua/move.lua`) when the job leaves fal, whichever way it leaves
(result stored, failed, cancelled, retried, or a submit that did not reach fal). Nothing
releases a slot by hand.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

from lipsync.jobstore import load_script
from lipsync.keys import Keys


@dataclass(frozen=True)
class Admission:
    admitted: bool
    retry_after: float


class AdmissionControl:
    def __init__(
        self, client: redis.Redis[bytes], *, prefix: str, max_in_flight: int, submits_per_second: float
    ) -> None:
        self.redis = client
        keys = Keys(prefix)
        self.inflight_key = keys.inflight
        self.bucket_key = keys.submit_rate
        self.max_in_flight = max_in_flight
        self.submits_per_second = submits_per_second
        self._admit = load_script(client, "admit")

    def admit(self, job_id: str) -> Admission:
        """Take a slot for the job (or find it already holds one); else how long to wait."""
        admitted, retry_after = self._admit(
            keys=[self.inflight_key, self.bucket_key],
            args=[job_id, self.max_in_flight, self.submits_per_second, repr(time.time())],
        )
        return Admission(bool(int(admitted)), float(retry_after))

    def in_flight(self) -> int:
        return int(self.redis.scard(self.inflight_key))
