"""Every Redis key of the job engine, in one place (as arq's constants): a reader finds them all at
once, and a future Redis Cluster hash tag is one change here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str = "lipsync"

    # one job
    def job(self, job_id: str) -> str:
        """The job record: a hash (JSON fields, `status`, `ts:<status>`, `attempts:<name>`, the lease)."""
        return f"{self.prefix}:job:{job_id}"

    def events(self, job_id: str) -> str:
        """The job's story: a stream, capped at about 500 entries."""
        return f"{self.prefix}:job:{job_id}:events"

    def status_prefix(self) -> str:
        """`<prefix>:status:<status>` sets; the Lua scripts append the status they move from/to."""
        return f"{self.prefix}:status:"

    def status(self, status: str) -> str:
        return f"{self.status_prefix()}{status}"

    def idempotency(self, idempotency_key: str) -> str:
        return f"{self.prefix}:idem:{idempotency_key}"

    def batch(self, batch_id: str) -> str:
        return f"{self.prefix}:batch:{batch_id}"

    def tenant_jobs(self, tenant: str) -> str:
        return f"{self.prefix}:tenant:{tenant}:jobs"

    # indexes and schedules
    @property
    def jobs(self) -> str:
        """Every job, scored by creation time."""
        return f"{self.prefix}:jobs"

    @property
    def finished(self) -> str:
        """Jobs that ended, scored by when (kept a week), for `lipsync stats`."""
        return f"{self.prefix}:finished"

    @property
    def schedule(self) -> str:
        """Jobs that need a Celery step (stage, submit, store), scored by when: the dispatcher's safety net."""
        return f"{self.prefix}:schedule"

    @property
    def waiting(self) -> str:
        """Jobs at fal, scored by their next status check: the poller's work list."""
        return f"{self.prefix}:waiting"

    @property
    def callbacks(self) -> str:
        """Ended jobs with a callback still to deliver, scored by the next attempt's time."""
        return f"{self.prefix}:callbacks"

    # admission to fal
    @property
    def inflight(self) -> str:
        """Jobs holding an admission slot (a request at fal, or its POST under way)."""
        return f"{self.prefix}:inflight"

    @property
    def pending_prefix(self) -> str:
        """The fair queue of jobs waiting for a slot (lua/admit.lua): `<this><priority>:<tenant>` zsets
        of job ids by arrival, `<this><priority>` the tenants with jobs waiting by virtual time,
        `<this>vt` a tenant's virtual time while it has none waiting."""
        return f"{self.prefix}:pending:"

    @property
    def submit_rate(self) -> str:
        return f"{self.prefix}:submit-rate"

    @property
    def fal_account(self) -> str:
        """The fal account's breaker, a hash (reason, since, probe_at, interval) while fal refuses
        submits (locked account, refused key); absent while it accepts them."""
        return f"{self.prefix}:fal-account"

    @property
    def fal_account_probe(self) -> str:
        """The one probe submit allowed per interval while the breaker is open (SET NX PX)."""
        return f"{self.prefix}:fal-account:probe"

    def fal_request_owner(self, request_id: str) -> str:
        """Which job a fal request belongs to (a day): a reconciled job never adopts another's request."""
        return f"{self.prefix}:fal-request:{request_id}"

    @property
    def fal_concurrency(self) -> str:
        """The account's concurrency as admission knows it: the hint, raised to the most requests seen
        IN_PROGRESS at once while none waited IN_QUEUE."""
        return f"{self.prefix}:fal-concurrency"

    @property
    def fal_seconds(self) -> str:
        """Recent inference times at fal (a short list, newest first): when a first check makes sense."""
        return f"{self.prefix}:fal-seconds"

    @property
    def fal_scouts(self) -> str:
        """Jobs submitted while fal's typical time is unknown that were made scouts (a counter that
        expires): they are checked early, the rest wait until the first end is learned."""
        return f"{self.prefix}:fal-scouts"

    # fal webhooks received by the gateway
    @property
    def webhooks_rejected(self) -> str:
        return f"{self.prefix}:fal-webhooks:rejected"

    def webhook_seen(self, signature_sha256: str) -> str:
        return f"{self.prefix}:fal-webhooks:seen:{signature_sha256}"
