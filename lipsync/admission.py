"""Admission to fal, shared by every worker through Redis: an adaptive cap on jobs in flight (the
account's observed concurrency plus a small buffer, under the configured ceiling) and a submit rate.

One Lua script (`lua/admit.lua`) decides both, so two workers can never both take the last
slot. A slot is part of the job's state: it is taken here, by the submit step, and given back
by the job store's one write (`lua/move.lua`) when the job leaves fal, whichever way it leaves
(result stored, failed, cancelled, retried, or a submit that did not reach fal). Nothing
releases a slot by hand.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import redis

from lipsync.jobstore import load_script
from lipsync.keys import Keys
from lipsync.models import Priority


@dataclass(frozen=True)
class Admission:
    admitted: bool
    retry_after: float
    # With a claim: an earlier submit already claimed the job (it may have reached fal).
    claimed_before: bool = False
    # With a claim: the job moved on or has its request already; nothing was taken.
    refused: bool = False
    # Not admitted: the free slot went to this job, first in the fair order; the caller wakes it.
    wake: str | None = None


class AdmissionControl:
    def __init__(
        self,
        client: redis.Redis[bytes],
        *,
        prefix: str,
        max_in_flight: int,
        submits_per_second: float,
        queue_buffer: int = 0,
        concurrency_hint: int = 10,
        tenant_weights: Mapping[str, float] | None = None,
    ) -> None:
        self.redis = client
        self.keys = keys = Keys(prefix)
        self.inflight_key = keys.inflight
        self.bucket_key = keys.submit_rate
        self.max_in_flight = max_in_flight
        self.submits_per_second = submits_per_second
        self.queue_buffer = queue_buffer
        self.concurrency_hint = concurrency_hint
        self.tenant_weights = " ".join(f"{name} {weight:g}" for name, weight in (tenant_weights or {}).items())
        self._admit = load_script(client, "admit")

    def admit(
        self,
        job_id: str,
        *,
        claim: str | None = None,
        status: str = "submitting",
        priority: Priority = Priority.normal,
        tenant: str | None = None,
    ) -> Admission:
        """Take a slot for the job (or find it already holds one); else how long to wait.

        With `claim`, the job's submit claim (that field, set to now) is written in the same
        call, provided the job is in `status`, has no claim and no fal request yet; and the job
        waits its turn in the fair queue (strict by priority, weighted-fair across tenants).
        """
        code, retry_after = self._admit(
            keys=[
                self.inflight_key,
                self.bucket_key,
                self.keys.job(job_id) if claim else "",
                self.keys.status("in_progress"),
                self.keys.status("in_queue"),
                self.keys.fal_concurrency,
            ],
            args=[
                job_id,
                self.max_in_flight,
                self.submits_per_second,
                repr(time.time()),
                claim or "",
                status,
                self.queue_buffer,
                self.concurrency_hint,
                self.keys.pending_prefix,
                self.keys.job(""),
                priority.value,
                tenant or "",
                self.tenant_weights,
            ],
        )
        code = int(code)
        if code == 2:
            wake = retry_after.decode() if isinstance(retry_after, bytes) else str(retry_after)
            return Admission(False, 1.0, wake=wake)
        if code < 0:
            return Admission(False, 0.0, claimed_before=code == -1, refused=code == -2)
        return Admission(code == 1, float(retry_after))

    def in_flight(self) -> int:
        return int(self.redis.scard(self.inflight_key))
