"""The job store: one Redis hash per job, an event stream per job, and two durable schedules.

Every write is one Lua script (in `lipsync/lua/`, each with a header naming its keys and
arguments), so a job's status, fields, event, lease, schedule entry and admission slot change
together or not at all. The writes are small and named (`create`, `begin`, `advance`, `wait`,
`fail`, `cancel`, `requeue`, `note`); all of them are `move.lua` underneath, with different
arguments. The schedules are sorted sets of job ids scored by when the job next needs looking
at: `schedule` for Celery steps (the dispatcher's safety net), `waiting` for jobs at fal (the
poller's work list). Whoever claims an entry pushes its score one lease ahead, so a job whose
worker died becomes due again by itself.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from lipsync.errors import IdempotencyConflict, JobNotFound
from lipsync.keys import Keys
from lipsync.models import AT_FAL_STATUSES, TERMINAL_STATUSES, Job, JobError, JobStatus
from lipsync.replication import ReplicaAck

# Top-level Job fields stored as JSON, one hash field each (status and timestamps are separate).
_JSON_FIELDS = (
    "request", "idempotency_key", "request_digest", "batch_id", "metadata", "inputs", "fal",
    "logs", "output", "error", "cost_estimate_usd", "expected_duration", "created_at",
    "updated_at", "deadline_at", "tenant", "callback_url", "fal_priority", "waiting_on", "priority",
)  # fmt: skip

FINISHED_KEPT_S = 7 * 24 * 3600.0
_LUA = Path(__file__).resolve().parent / "lua"
_AT_FAL = " ".join(sorted(s.value for s in AT_FAL_STATUSES))
_ENDED = " ".join(sorted(s.value for s in TERMINAL_STATUSES))
_NOT_ENDED = [s for s in JobStatus if not s.terminal]
_EVERY = " ".join(s.value for s in JobStatus)

log = logging.getLogger("lipsync.job")

# Called after every applied status change: (store, job id, before, after, fields written, event,
# what the write read for the metrics: when the job entered `before`, ts:submitted, ts:queued, cost).
Observer = Callable[["JobStore", str, JobStatus | None, JobStatus, Mapping[str, Any], str | None, Sequence[Any]], None]


def load_script(client: redis.Redis[bytes], name: str) -> Any:
    return client.register_script((_LUA / f"{name}.lua").read_text())


class LeaseLost(Exception):
    """Another runner holds the job now (ours lapsed): stop, and write nothing."""


@dataclass(frozen=True)
class Moved:
    applied: bool
    before: JobStatus | None
    # The job as written, when the lease was handed to the next step's runner (`hand_to`).
    job: Job | None = None


@dataclass(frozen=True)
class Begun:
    """What `begin` found: the job with our lease on it, or why not."""

    job: Job | None
    busy: bool = False  # another live runner holds the job
    status: JobStatus | None = None  # the job's status when it is not this step's


@dataclass(frozen=True)
class WaitingJob:
    """A job at fal whose status check is due, as the poller claimed it."""

    id: str
    status: JobStatus
    fal: dict[str, Any] | None
    deadline_at: float
    polls: int
    submitted_at: float | None


def _now() -> float:
    return time.time()


def _names(statuses: Iterable[JobStatus] | None) -> str:
    return "" if statuses is None else " ".join(s.value for s in statuses)


class JobStore:
    def __init__(
        self,
        client: redis.Redis[bytes],
        prefix: str = "lipsync",
        *,
        observer: Observer | None = None,
        ack: ReplicaAck | None = None,
    ) -> None:
        self.redis = client
        # Replica acknowledgement of the money-critical writes (`durable`); None: a single Redis.
        self.ack = ack
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.schedule_key = self.keys.schedule
        self.waiting_key = self.keys.waiting
        self.callbacks_key = self.keys.callbacks
        self.observer = observer
        self._create = load_script(client, "create")
        self._begin = load_script(client, "begin")
        self._renew = load_script(client, "renew")
        self._move_script = load_script(client, "move")
        self._claim = load_script(client, "claim")
        self._claim_waiting = load_script(client, "claim_waiting")
        self._rescore_waiting = load_script(client, "rescore_waiting")
        self._confirm = load_script(client, "confirm")

    def job_key(self, job_id: str) -> str:
        return self.keys.job(job_id)

    def events_key(self, job_id: str) -> str:
        return self.keys.events(job_id)

    # create / read ---------------------------------------------------------
    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex

    def create(self, job: Job, *, dispatch_lease_s: float) -> tuple[Job, bool]:
        """Store a new job, due in the schedule one dispatch lease from now. Returns (job, created).

        With an idempotency key already used, returns the job that key made, provided it
        was made from the same request; a different request under the same key is an error.
        """
        document = job.model_dump(mode="json")
        # Absent, not null: "no fal request yet" must be testable with HEXISTS in Lua.
        fields = {name: json.dumps(document[name]) for name in _JSON_FIELDS if document[name] is not None}
        fields.update({"status": job.status.value, "ts:queued": repr(job.created_at), "id": job.id})
        keys = self.keys
        created, job_id = self._create(
            keys=[
                keys.job(job.id),
                keys.events(job.id),
                keys.schedule,
                keys.jobs,
                keys.status("queued"),
                keys.idempotency(job.idempotency_key) if job.idempotency_key is not None else "",
                keys.batch(job.batch_id) if job.batch_id is not None else "",
                keys.tenant_jobs(job.tenant) if job.tenant is not None else "",
            ],  # fmt: skip
            args=[job.id, repr(job.created_at), repr(job.created_at + dispatch_lease_s), json.dumps(fields)],
        )
        if created:
            return job, True
        existing = self.get(_text(job_id))
        if existing.request_digest != job.request_digest:
            raise IdempotencyConflict(
                f"idempotency key {job.idempotency_key!r} was already used for job "
                f"{existing.id} with a different request; use a new key for a new request"
            )
        return existing, False

    def get(self, job_id: str) -> Job:
        raw = self.redis.hgetall(self.job_key(job_id))
        if not raw:
            raise JobNotFound(f"no job with id {job_id!r}")
        return _decode(job_id, raw)

    def get_many(self, job_ids: Iterable[str]) -> list[Job]:
        ids = list(job_ids)
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(self.job_key(job_id))
        return [_decode(i, raw) for i, raw in zip(ids, pipe.execute(), strict=True) if raw]

    def statuses(self, job_ids: Iterable[str]) -> dict[str, JobStatus | None]:
        ids = list(job_ids)
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(self.job_key(job_id), "status")
        return {job_id: JobStatus(_text(raw)) if raw else None for job_id, raw in zip(ids, pipe.execute(), strict=True)}

    def list_ids(self, *, status: JobStatus | None = None, batch_id: str | None = None, limit: int = 100) -> list[str]:
        if batch_id is not None:
            ids = [_text(i) for i in self.redis.zrange(self.keys.batch(batch_id), 0, -1)]
            if status is not None:
                members = self.statuses(ids)
                ids = [i for i in ids if members[i] is status]
            return ids[-limit:] if limit else ids
        if status is not None:
            ids = [_text(i) for i in self.redis.smembers(self.keys.status(status.value))]
            return ids[:limit] if limit else ids
        return [_text(i) for i in self.redis.zrevrange(self.keys.jobs, 0, limit - 1)]

    def counts(self) -> dict[str, int]:
        pipe = self.redis.pipeline(transaction=False)
        for status in JobStatus:
            pipe.scard(self.keys.status(status.value))
        return {s.value: int(n) for s, n in zip(JobStatus, pipe.execute(), strict=True)}

    def finished_ids(self, since: float) -> list[str]:
        """Jobs that reached an end status since `since` (kept a week), oldest first."""
        return [_text(i) for i in self.redis.zrangebyscore(self.keys.finished, since, "+inf")]

    def events(self, job_id: str) -> list[dict[str, str]]:
        entries = self.redis.xrange(self.events_key(job_id))
        return [{_text(k): _text(v) for k, v in fields.items()} for _, fields in entries]

    def raw_field(self, job_id: str, name: str) -> str | None:
        value = self.redis.hget(self.job_key(job_id), name)
        return None if value is None else _text(value)

    # a step's hold on a job ------------------------------------------------
    def begin(
        self,
        job_id: str,
        owner: str,
        lease_s: float,
        handles: Iterable[JobStatus],
        *,
        working: JobStatus | None = None,
        counter: str | None = None,
    ) -> Begun:
        """Take the job's lease for a step, move it to the step's working status, and read it."""
        now = _now()
        found = self._begin(
            keys=[self.job_key(job_id), self.events_key(job_id), self.schedule_key],
            args=[
                job_id,
                owner,
                repr(now),
                repr(lease_s),
                _names(handles),
                working.value if working else "",
                self.keys.status_prefix(),
                counter or "",
            ],  # fmt: skip
        )
        code = int(found[0])
        if code < 0:
            raise JobNotFound(f"no job with id {job_id!r}")
        if code == 0:
            return Begun(None, busy=True)
        if code == 2:
            return Begun(None, status=JobStatus(_text(found[1])))
        before = JobStatus(_text(found[1]))
        job = _decode(job_id, dict(zip(found[2::2], found[3::2], strict=True)))
        if working is not None and before is not working and self.observer is not None:
            raw = dict(zip(found[2::2], found[3::2], strict=True))
            known = [raw.get(f"ts:{name}".encode()) for name in (before.value, "submitted", "queued")]
            self.observer(self, job_id, before, working, {}, working.value, [*known, raw.get(b"cost_estimate_usd")])
        return Begun(job)

    def renew(self, job_id: str, owner: str, lease_s: float) -> bool:
        """Extend our lease; False when another runner holds the job now."""
        renewed = self._renew(
            keys=[self.job_key(job_id), self.schedule_key], args=[job_id, owner, repr(_now()), repr(lease_s)]
        )
        return int(renewed) == 1

    # named writes ----------------------------------------------------------
    def advance(
        self,
        job_id: str,
        to: JobStatus,
        *,
        from_: Iterable[JobStatus],
        fields: Mapping[str, Any] | None = None,
        event: str | None = None,
        due_at: float | None = None,
        owner: str | None = None,
        count: Iterable[str] = (),
        durable: bool = False,
        hand_to: tuple[str, float] | None = None,
    ) -> Moved:
        """Move the job on to `to` (from one of `from_`), due again at `due_at` (None: not scheduled).

        `durable`: the fields are money-critical (the fal request id) and acknowledged by the
        replicas (`ack`) before this returns, rewritten as they are if an earlier try wrote them.
        `hand_to` (owner, seconds): the runner's lease passes to the next step's runner, which
        runs in place; the job as written comes back in `Moved.job` (None: not handed on).
        """
        return self._move(
            job_id, to=to, from_=from_, fields=fields, event=event, owner=owner, count=count,
            due="-" if due_at is None else repr(due_at), durable=durable, hand_to=hand_to,
        )  # fmt: skip

    def wait(
        self,
        job_id: str,
        due_at: float,
        *,
        from_: Iterable[JobStatus] | None = None,
        to: JobStatus | None = None,
        fields: Mapping[str, Any] | None = None,
        event: str | None = None,
        owner: str | None = None,
        count: Iterable[str] = (),
    ) -> Moved:
        """The job needs another look at `due_at`; meanwhile it holds no worker."""
        return self._move(
            job_id, to=to, from_=from_, fields=fields, event=event, owner=owner, count=count, due=repr(due_at)
        )

    def fail(
        self,
        job_id: str,
        error: JobError,
        *,
        from_: Iterable[JobStatus] | None = None,
        owner: str | None = None,
        count: Iterable[str] = (),
        by: str | None = None,
    ) -> Moved:
        """End the job as failed, with its error in words (from any status not ended, by default)."""
        return self._move(
            job_id,
            to=JobStatus.failed,
            from_=_NOT_ENDED if from_ is None else from_,
            fields={"error": error.model_dump(mode="json")},
            event=f"failed{f' (by {by})' if by else ''}: {error.code}: {error.message}",
            owner=owner,
            count=count,
        )

    def cancel(self, job_id: str, event: str) -> Moved:
        return self._move(job_id, to=JobStatus.cancelled, from_=_NOT_ENDED, event=event)

    def requeue(
        self,
        job_id: str,
        *,
        from_: Iterable[JobStatus],
        fields: Mapping[str, Any],
        clear: Iterable[str],
        due_at: float,
        event: str,
    ) -> Moved:
        """Start an ended job over from `queued` (a retry), clearing what its last run left."""
        return self._move(
            job_id, to=JobStatus.queued, from_=from_, fields=fields, delete=clear, count=["attempts:retries"],
            due=repr(due_at), event=event,
        )  # fmt: skip

    def resubmit(
        self,
        job_id: str,
        *,
        from_: Iterable[JobStatus],
        clear: Iterable[str],
        event: str,
        due_at: float | None = None,
        count: Iterable[str] = (),
    ) -> Moved:
        """fal ended the job's request without running the model (its start timeout, an input it
        could not download): back to `submitting`, due at `due_at` (None: now), its request
        forgotten (the admission slot is given back as it leaves fal)."""
        return self._move(
            job_id, to=JobStatus.submitting, from_=from_, delete=clear, count=["attempts:resubmits", *count],
            due=repr(time.time() if due_at is None else due_at), event=event,
        )  # fmt: skip

    def store_again(
        self, job_id: str, *, from_: Iterable[JobStatus], fields: Mapping[str, Any], clear: Iterable[str], event: str
    ) -> Moved:
        """A retry of a job whose fal result is known and still kept: back to `storing`, fal's request kept."""
        return self._move(
            job_id, to=JobStatus.storing, from_=from_, fields=fields, delete=clear, count=["attempts:retries"],
            due=repr(time.time() + 60), event=event,
        )  # fmt: skip

    def note(
        self,
        job_id: str,
        *,
        event: str | None = None,
        fields: Mapping[str, Any] | None = None,
        raw: Mapping[str, str] | None = None,
        delete: Iterable[str] = (),
        count: Iterable[str] = (),
    ) -> Moved:
        """Record something about the job without moving it (an event, a counter, a field)."""
        return self._move(job_id, fields=fields, raw=raw, delete=delete, count=count, event=event)

    def confirm(self, job_id: str, names: Sequence[str]) -> int:
        """Make the job's fields `names` durable on the replicas (`ack`): each is rewritten as it
        is and WAIT sent after it on the same connection. Returns how many the job has; raises
        `ReplicaAckTimeout` (policy refuse) when too few replicas acknowledge in time."""
        if self.ack is None:
            return len(names)
        pipe = self.redis.pipeline(transaction=False)
        self._confirm(keys=[self.job_key(job_id)], args=list(names), client=pipe)
        (found,) = self.ack.acknowledge(pipe)
        return int(found)

    def release(self, job_id: str, owner: str) -> Moved:
        """Give our lease back without changing anything else."""
        return self._move(job_id, owner=owner)

    def unschedule(self, job_id: str, *, callback: bool = False) -> None:
        """Out of both schedules; with `callback`, out of the callbacks to deliver too (a job gone)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrem(self.schedule_key, job_id)
        pipe.zrem(self.waiting_key, job_id)
        if callback:
            pipe.zrem(self.callbacks_key, job_id)
        pipe.execute()

    def _move(
        self,
        job_id: str,
        *,
        to: JobStatus | None = None,
        from_: Iterable[JobStatus] | None = None,
        owner: str | None = None,
        due: str = "",
        fields: Mapping[str, Any] | None = None,
        raw: Mapping[str, str] | None = None,
        delete: Iterable[str] = (),
        count: Iterable[str] = (),
        absent: Iterable[str] = (),
        event: str | None = None,
        durable: bool = False,
        hand_to: tuple[str, float] | None = None,
    ) -> Moved:
        encoded = {name: json.dumps(value) for name, value in (fields or {}).items()}
        encoded.update(raw or {})
        keys = self.keys
        move = dict(
            keys=[
                keys.job(job_id),
                keys.events(job_id),
                keys.schedule,
                keys.waiting,
                keys.inflight,
                keys.finished,
                keys.callbacks,
            ],
            args=[
                job_id,
                repr(_now()),
                keys.status_prefix(),
                _names(from_),
                to.value if to else "",
                owner or "",
                due,
                json.dumps(encoded) if encoded else "",
                " ".join(delete),
                " ".join(count),
                " ".join(absent),
                event or "",
                _AT_FAL,
                _ENDED,
                repr(FINISHED_KEPT_S),
                _EVERY,
                f"{hand_to[0]} {hand_to[1]!r}" if hand_to else "",
            ],
        )
        if durable and self.ack is not None and encoded:
            # One connection for the move, the rewrite of its fields (a retry whose move is
            # refused because the first try wrote it still writes) and WAIT, which counts the
            # writes of its own connection only (lipsync.replication).
            pipe = self.redis.pipeline(transaction=False)
            self._move_script(**move, client=pipe)
            self._confirm(keys=[keys.job(job_id)], args=sorted(encoded), client=pipe)
            reply = self.ack.acknowledge(pipe)[0]
        else:
            reply = self._move_script(**move)
        code, before_raw, known = int(reply[0]), reply[1], reply[2:6]
        handed = _decode(job_id, dict(zip(reply[6][::2], reply[6][1::2], strict=True))) if len(reply) > 6 else None
        if code == -1:
            raise JobNotFound(f"no job with id {job_id!r}")
        if code == -2:
            raise LeaseLost(f"job {job_id}: another runner holds it now; this one's work is not written")
        before = JobStatus(_text(before_raw)) if before_raw else None
        if code == 1 and to is not None and to is not before and self.observer is not None:
            self.observer(self, job_id, before, to, fields or {}, event, known)
        return Moved(code == 1, before, handed)

    # the schedules ---------------------------------------------------------
    def claim_due(self, lease_s: float, limit: int) -> list[str]:
        """Jobs a Celery step should look at now (the safety net for lost messages and dead workers)."""
        return self.claim_due_or_next(lease_s, limit)[0]

    def claim_due_or_next(self, lease_s: float, limit: int, key: str | None = None) -> tuple[list[str], float | None]:
        """Claim due entries of the schedule (or `key`); when none is due, when the next one is."""
        raw = self._claim(keys=[key or self.schedule_key], args=[repr(_now()), repr(lease_s), limit])
        return _claimed(raw)

    def claim_due_callbacks(self, lease_s: float, limit: int) -> list[str]:
        return self.claim_due_or_next(lease_s, limit, self.callbacks_key)[0]

    def claim_waiting(self, lease_s: float, limit: int) -> list[WaitingJob]:
        """Jobs at fal whose status check is due, each held for `lease_s` (the poller's batch)."""
        return self.claim_waiting_or_next(lease_s, limit)[0]

    def claim_waiting_or_next(self, lease_s: float, limit: int) -> tuple[list[WaitingJob], float | None]:
        flat = self._claim_waiting(keys=[self.waiting_key], args=[repr(_now()), repr(lease_s), limit, self.job_key("")])
        if len(flat) == 2 and not flat[0]:
            return [], float(flat[1]) if flat[1] else None
        found = []
        for i in range(0, len(flat), 6):
            job_id, status, fal, deadline, polls, submitted = (_text(v) for v in flat[i : i + 6])
            found.append(
                WaitingJob(
                    id=job_id,
                    status=JobStatus(status),
                    fal=json.loads(fal) if fal else None,
                    deadline_at=float(json.loads(deadline)) if deadline else float("inf"),
                    polls=int(polls),
                    submitted_at=float(submitted) if submitted else None,
                )
            )
        return found, None

    def bring_checks_forward(self, typical_s: float, limit: int = 10_000) -> int:
        """Waiting jobs due later than submitted + `typical_s` are checked then instead."""
        moved = self._rescore_waiting(
            keys=[self.waiting_key], args=[repr(_now()), repr(typical_s), self.job_key(""), limit]
        )
        return int(moved)

    def check_again(self, job_id: str, at: float) -> None:
        """A status check that changed nothing: only its next time. `XX`: a job that left fal
        meanwhile (stored by a webhook, cancelled) is not put back."""
        self.redis.zadd(self.waiting_key, {job_id: at}, xx=True)

    def schedule(self, job_id: str, at: float) -> None:
        self.redis.zadd(self.schedule_key, {job_id: at})

    def scheduled_at(self, job_id: str) -> float | None:
        """When the job is next due, in either schedule (None: in neither)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zscore(self.schedule_key, job_id)
        pipe.zscore(self.waiting_key, job_id)
        scores = [float(s) for s in pipe.execute() if s is not None]
        return min(scores) if scores else None

    def reschedule_lost(self, count: int = 500) -> list[str]:
        """Jobs not ended that are in neither schedule, put back in `schedule`, due now.

        Every write keeps a job and its entry together, but a Redis failover can forget the
        last writes: the promoted replica may hold a job whose entry a later write would have
        made, or a job a producer was told was created. The dispatcher routes each to its step
        (or to `waiting`, if it is at fal); one that ended meanwhile is dropped there."""
        lost: list[str] = []
        for status in _NOT_ENDED:
            for raw in self.redis.sscan_iter(self.keys.status(status.value), count=count):
                job_id = _text(raw)
                if self.scheduled_at(job_id) is None:
                    lost.append(job_id)
        if lost:
            self.redis.zadd(self.schedule_key, dict.fromkeys(lost, _now()), nx=True)
        return lost

    def schedule_size(self) -> int:
        pipe = self.redis.pipeline(transaction=False)
        pipe.zcard(self.schedule_key)
        pipe.zcard(self.waiting_key)
        return sum(int(n) for n in pipe.execute())


def _claimed(raw: list[Any]) -> tuple[list[str], float | None]:
    if len(raw) == 2 and not raw[0]:
        return [], float(raw[1]) if raw[1] else None
    return [_text(job_id) for job_id in raw], None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decode(job_id: str, raw: Mapping[bytes, bytes]) -> Job:
    fields = {_text(k): _text(v) for k, v in raw.items()}
    document: dict[str, Any] = {"id": job_id, "status": fields["status"]}
    for name in _JSON_FIELDS:
        if name in fields:
            document[name] = json.loads(fields[name])
    document["timestamps"] = {name[3:]: float(value) for name, value in fields.items() if name.startswith("ts:")}
    document["attempts"] = {name[9:]: int(value) for name, value in fields.items() if name.startswith("attempts:")}
    return Job.model_validate(document)
