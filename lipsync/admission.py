"""Admission to fal, shared by every worker through Redis: an adaptive cap on jobs in flight (the
account's observed concurrency plus a small buffer, under the configured ceiling) and a submit rate.

One Lua script (`lua/admit.lua`) decides both, so two workers can never both take the last
slot. A slot is part of the job's state: it is taken here, by the submit step, and given back
by the job store's one write (`lua/move.lua`) when the job leaves fal, whichever way it leaves
(result stored, failed, cancelled, retried, or a submit that did not reach fal). Nothing
releases a slot by hand.

A job refused for a full cap does not spin: it waits `recheck_s` (a safety net, 300 s by default),
and the slot freed when a job leaves fal is handed at once to the head of the fair queue by
`dispatch` (run by the poller each turn): reserved for that job, which is woken, and whose
schedule entry is brought forward to `WAKE_BACKUP_S` in the same call (a lost wake costs seconds). A job refused by
the submit rate alone (slots free) waits the short time until the next token.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import redis

from config.settings import Settings
from lipsync.jobstore import load_script
from lipsync.keys import Keys
from lipsync.models import Priority

# A job given a reserved slot is due in the schedule within this many seconds: should its wake be
# lost (the waking worker dying before it sends), the schedule sends its submit instead.
WAKE_BACKUP_S = 10.0


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
        recheck_s: float = 300.0,
        credit_slots: float | None = None,
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
        self.recheck_s = recheck_s
        # An idle tenant may come back this many slots behind the least active one (default: two
        # rounds of the account's concurrency), so a small tenant is not held to every other slot.
        self.credit_slots = 2 * concurrency_hint if credit_slots is None else credit_slots
        self._admit = load_script(client, "admit")

    @classmethod
    def from_settings(cls, client: redis.Redis[bytes], settings: Settings) -> AdmissionControl:
        return cls(
            client,
            prefix=settings.key_prefix,
            max_in_flight=settings.max_in_flight,
            submits_per_second=settings.submits_per_second,
            queue_buffer=settings.fal_queue_buffer,
            concurrency_hint=settings.fal_concurrency_hint,
            tenant_weights=settings.tenant_weights,
            recheck_s=settings.admission_recheck_s,
            credit_slots=settings.tenant_credit_slots,
        )

    def admit(
        self,
        job_id: str,
        *,
        claim: str | None = None,
        status: str = "submitting",
        priority: Priority = Priority.normal,
        tenant: str | None = None,
        with_claim: tuple[str, str] | None = None,
    ) -> Admission:
        """Take a slot for the job (or find it already holds one); else how long to wait.

        With `claim`, the job's submit claim (that field, set to now) is written in the same
        call, provided the job is in `status`, has no claim and no fal request yet, together with
        the field `with_claim` (name, value); and the job waits its turn in the fair queue
        (strict by priority, weighted-fair across tenants).
        """
        code, value = self._call(
            job_id, claim=claim, status=status, priority=priority, tenant=tenant, with_claim=with_claim
        )
        if code == 2:  # the slot went to the job whose turn it is; this one is woken when its turn comes
            return Admission(False, self.recheck_s, wake=value)
        if code < 0:
            return Admission(False, 0.0, claimed_before=code == -1, refused=code == -2)
        return Admission(code == 1, float(value))

    def anyone_waiting(self) -> bool:
        """Whether any job waits in the fair queue, of any priority (one command)."""
        pending = self.keys.pending_prefix
        return int(self.redis.exists(*(f"{pending}{priority.value}" for priority in Priority))) > 0

    def dispatch(self, *, status: str = "submitting", limit: int = 100) -> list[str]:
        """Hand the free slots to the jobs whose turn it is (the fair queue's heads, as `admit`
        chooses): each slot is reserved for its job, whose id is returned for the caller to wake.
        Stops when no slot or submit token is free or nothing waits."""
        chosen: list[str] = []
        while len(chosen) < limit:
            code, value = self._call("", claim=None, status=status, dispatch=True)
            if code != 2:
                break
            chosen.append(value)
        return chosen

    def _call(
        self,
        job_id: str,
        *,
        claim: str | None,
        status: str,
        priority: Priority = Priority.normal,
        tenant: str | None = None,
        dispatch: bool = False,
        with_claim: tuple[str, str] | None = None,
    ) -> tuple[int, str]:
        code, value = self._admit(
            keys=[
                self.inflight_key,
                self.bucket_key,
                self.keys.job(job_id) if claim else "",
                self.keys.status("in_progress"),
                self.keys.status("in_queue"),
                self.keys.fal_concurrency,
                self.keys.schedule,
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
                repr(float(self.recheck_s)),
                repr(float(self.credit_slots)),
                "dispatch" if dispatch else "",
                repr(WAKE_BACKUP_S),
                *(with_claim or ("", "")),
            ],
        )
        return int(code), value.decode() if isinstance(value, bytes) else str(value)

    def in_flight(self) -> int:
        return int(self.redis.scard(self.inflight_key))
