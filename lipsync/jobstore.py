"""The job store: one Redis hash per job, an event stream per job, and the durable schedule.

Every write is one Lua script, so a transition, its timestamp, its event and the job's next
entry in the schedule land together or not at all. The schedule (a sorted set of job ids
scored by when the job next needs a worker) is what makes waiting free and crashes
harmless: whoever claims an entry pushes its score one lease ahead, so a job whose worker
died becomes due again by itself.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import redis

from lipsync.errors import IdempotencyConflict, JobNotFound
from lipsync.models import Job, JobStatus

# Top-level Job fields stored as JSON, one hash field each (status and timestamps are separate).
_JSON_FIELDS = (
    "request", "idempotency_key", "request_digest", "batch_id", "metadata", "inputs", "fal",
    "logs", "output", "error", "cost_estimate_usd", "expected_duration", "created_at",
    "updated_at", "deadline_at", "tenant", "callback_url", "fal_priority",
)  # fmt: skip

_TRANSITION = """
local spec = cjson.decode(ARGV[1])
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {-1, ''} end
if spec['from'] then
  local allowed = false
  for _, s in ipairs(spec['from']) do if s == cur then allowed = true end end
  if not allowed then return {0, cur} end
end
if spec['require_absent'] then
  for _, f in ipairs(spec['require_absent']) do
    if redis.call('HEXISTS', KEYS[1], f) == 1 then return {0, cur} end
  end
end
local now = spec['now']
local to = spec['to']
if to then
  redis.call('HSET', KEYS[1], 'status', to)
  if to ~= cur then
    -- ts:<status> is when the job entered it: a poll that finds it still in_queue keeps it.
    redis.call('HSET', KEYS[1], 'ts:' .. to, now)
    redis.call('SREM', spec['prefix'] .. ':status:' .. cur, spec['id'])
    redis.call('SADD', spec['prefix'] .. ':status:' .. to, spec['id'])
  end
end
redis.call('HSET', KEYS[1], 'updated_at', now)
if spec['set'] then
  for f, v in pairs(spec['set']) do redis.call('HSET', KEYS[1], f, v) end
end
if spec['del'] then
  for _, f in ipairs(spec['del']) do redis.call('HDEL', KEYS[1], f) end
end
if spec['incr'] then
  for f, n in pairs(spec['incr']) do redis.call('HINCRBY', KEYS[1], f, n) end
end
if spec['release'] and redis.call('HGET', KEYS[1], 'lease_owner') == spec['release'] then
  redis.call('HDEL', KEYS[1], 'lease_owner', 'lease_until')
end
if spec['schedule'] == 'remove' then
  redis.call('ZREM', KEYS[3], spec['id'])
elseif spec['schedule'] then
  redis.call('ZADD', KEYS[3], spec['schedule'], spec['id'])
end
if spec['event'] then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', 500, '*',
    'status', to or cur, 'from', cur, 'at', tostring(now), 'event', spec['event'])
end
if spec['ended'] and redis.call('HEXISTS', KEYS[1], 'callback_url') == 1 then
  redis.call('ZADD', spec['prefix'] .. ':callbacks', now, spec['id'])
end
if spec['finished'] then
  redis.call('ZADD', spec['prefix'] .. ':finished', now, spec['id'])
  redis.call('ZREMRANGEBYSCORE', spec['prefix'] .. ':finished', '-inf', now - spec['finished'])
end
return {1, cur}
"""

_CREATE = """
local spec = cjson.decode(ARGV[1])
if spec['idem_key'] then
  local existing = redis.call('GET', spec['idem_key'])
  if existing then return {0, existing} end
  redis.call('SET', spec['idem_key'], spec['id'])
end
for f, v in pairs(spec['fields']) do redis.call('HSET', KEYS[1], f, v) end
redis.call('ZADD', spec['prefix'] .. ':jobs', spec['now'], spec['id'])
redis.call('SADD', spec['prefix'] .. ':status:queued', spec['id'])
if spec['batch_id'] then
  redis.call('ZADD', spec['prefix'] .. ':batch:' .. spec['batch_id'], spec['now'], spec['id'])
end
if spec['tenant'] then
  redis.call('ZADD', spec['prefix'] .. ':tenant:' .. spec['tenant'] .. ':jobs', spec['now'], spec['id'])
end
redis.call('ZADD', KEYS[3], spec['schedule'], spec['id'])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 500, '*',
  'status', 'queued', 'from', '', 'at', tostring(spec['now']), 'event', 'created')
return {1, spec['id']}
"""

# A runner lease on a job: only one task works on a job at a time; a dead runner's lease lapses.
_LEASE = """
local owner = redis.call('HGET', KEYS[1], 'lease_owner')
local until_ = tonumber(redis.call('HGET', KEYS[1], 'lease_until') or '0')
local now = tonumber(ARGV[2])
if not redis.call('HGET', KEYS[1], 'status') then return -1 end
if owner and owner ~= ARGV[1] and until_ > now then return 0 end
if ARGV[4] == 'renew' and owner ~= ARGV[1] then return 0 end
local expiry = now + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'lease_owner', ARGV[1], 'lease_until', tostring(expiry))
redis.call('ZADD', KEYS[2], 'XX', 'GT', expiry, ARGV[5])
return 1
"""

# Claim due schedule entries: each claimed entry is pushed one lease into the future.
_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local until_ = tonumber(ARGV[1]) + tonumber(ARGV[2])
for _, id in ipairs(due) do redis.call('ZADD', KEYS[1], until_, id) end
return due
"""


FINISHED_KEPT_S = 7 * 24 * 3600.0


def _now() -> float:
    return time.time()


class JobStore:
    def __init__(self, client: redis.Redis[bytes], prefix: str = "lipsync") -> None:
        self.redis = client
        self.prefix = prefix
        self.schedule_key = f"{prefix}:schedule"
        # Jobs that ended with a callback still to deliver, scored by the next attempt's time.
        self.callbacks_key = f"{prefix}:callbacks"
        self._transition = client.register_script(_TRANSITION)
        self._create = client.register_script(_CREATE)
        self._lease = client.register_script(_LEASE)
        self._claim = client.register_script(_CLAIM)

    # keys ------------------------------------------------------------------
    def job_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def events_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:events"

    # create / read ---------------------------------------------------------
    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex

    def create(self, job: Job, *, dispatch_lease_s: float) -> tuple[Job, bool]:
        """Store a new job, due at once in the schedule. Returns (job, created).

        With an idempotency key already used, returns the job that key made, provided it
        was made from the same request; a different request under the same key is an error.
        """
        document = job.model_dump(mode="json")
        # Absent, not null: "no fal request yet" must be testable with HEXISTS in Lua.
        fields = {name: json.dumps(document[name]) for name in _JSON_FIELDS if document[name] is not None}
        fields["status"] = job.status.value
        fields["ts:queued"] = repr(job.created_at)
        fields["id"] = job.id
        spec: dict[str, Any] = {
            "id": job.id,
            "prefix": self.prefix,
            "now": job.created_at,
            "fields": fields,
            "schedule": job.created_at + dispatch_lease_s,
        }
        if job.batch_id is not None:  # cjson turns null into a userdata, not nil: leave it out
            spec["batch_id"] = job.batch_id
        if job.tenant is not None:
            spec["tenant"] = job.tenant
        if job.idempotency_key is not None:
            spec["idem_key"] = f"{self.prefix}:idem:{job.idempotency_key}"
        created, job_id = self._create(
            keys=[self.job_key(job.id), self.events_key(job.id), self.schedule_key],
            args=[json.dumps(spec)],
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
            ids = [_text(i) for i in self.redis.zrange(f"{self.prefix}:batch:{batch_id}", 0, -1)]
            if status is not None:
                members = self.statuses(ids)
                ids = [i for i in ids if members[i] is status]
            return ids[-limit:] if limit else ids
        if status is not None:
            ids = [_text(i) for i in self.redis.smembers(f"{self.prefix}:status:{status.value}")]
            return ids[:limit] if limit else ids
        return [_text(i) for i in self.redis.zrevrange(f"{self.prefix}:jobs", 0, limit - 1)]

    def counts(self) -> dict[str, int]:
        pipe = self.redis.pipeline(transaction=False)
        for status in JobStatus:
            pipe.scard(f"{self.prefix}:status:{status.value}")
        return {s.value: int(n) for s, n in zip(JobStatus, pipe.execute(), strict=True)}

    def finished_ids(self, since: float) -> list[str]:
        """Jobs that reached an end status since `since` (kept a week), oldest first."""
        return [_text(i) for i in self.redis.zrangebyscore(f"{self.prefix}:finished", since, "+inf")]

    def events(self, job_id: str) -> list[dict[str, str]]:
        entries = self.redis.xrange(self.events_key(job_id))
        return [{_text(k): _text(v) for k, v in fields.items()} for _, fields in entries]

    # writes ----------------------------------------------------------------
    def transition(
        self,
        job_id: str,
        to: JobStatus | None,
        *,
        from_: Iterable[JobStatus] | None = None,
        set_fields: Mapping[str, Any] | None = None,
        delete_fields: Iterable[str] = (),
        incr: Mapping[str, int] | None = None,
        require_absent: Iterable[str] = (),
        schedule_at: float | None = None,
        unschedule: bool = False,
        release: str | None = None,
        event: str | None = None,
    ) -> tuple[bool, JobStatus | None]:
        """Move a job to `to` (or only update it when `to` is None) if its status is in `from_`.

        Returns (applied, status before). `set_fields` values are JSON-encoded job fields,
        except names starting with an underscore, stored as plain strings.
        """
        spec: dict[str, Any] = {"id": job_id, "prefix": self.prefix, "now": _now()}
        if to is not None:
            spec["to"] = to.value
            if to.terminal:
                unschedule = True
                spec["finished"] = FINISHED_KEPT_S  # time-indexed for `lipsync stats`
                spec["ended"] = True  # queues the job's callback, if it has one, in the same script
        if from_ is not None:
            spec["from"] = [s.value for s in from_]
        if set_fields:
            spec["set"] = {
                name.lstrip("_") if name.startswith("_") else name: (
                    str(value) if name.startswith("_") else json.dumps(value)
                )
                for name, value in set_fields.items()
            }
        deletes = list(delete_fields)
        if deletes:
            spec["del"] = deletes
        if incr:
            spec["incr"] = dict(incr)
        absent = list(require_absent)
        if absent:
            spec["require_absent"] = absent
        if unschedule:
            spec["schedule"] = "remove"
        elif schedule_at is not None:
            spec["schedule"] = schedule_at
        if release is not None:
            spec["release"] = release
        if event is not None:
            spec["event"] = event
        applied, before = self._transition(
            keys=[self.job_key(job_id), self.events_key(job_id), self.schedule_key],
            args=[json.dumps(spec)],
        )
        if int(applied) < 0:
            raise JobNotFound(f"no job with id {job_id!r}")
        return int(applied) == 1, JobStatus(_text(before)) if before else None

    # leases and the schedule -----------------------------------------------
    def acquire(self, job_id: str, owner: str, lease_s: float) -> bool:
        """Take the job's runner lease (or renew our own); False if a live runner holds it."""
        return self._lease_call(job_id, owner, lease_s, "acquire")

    def renew(self, job_id: str, owner: str, lease_s: float) -> bool:
        return self._lease_call(job_id, owner, lease_s, "renew")

    def _lease_call(self, job_id: str, owner: str, lease_s: float, mode: str) -> bool:
        result = self._lease(
            keys=[self.job_key(job_id), self.schedule_key],
            args=[owner, repr(_now()), repr(lease_s), mode, job_id],
        )
        return int(result) == 1

    def claim_due(self, lease_s: float, limit: int) -> list[str]:
        due = self._claim(keys=[self.schedule_key], args=[repr(_now()), repr(lease_s), limit])
        return [_text(job_id) for job_id in due]

    def claim_due_callbacks(self, lease_s: float, limit: int) -> list[str]:
        due = self._claim(keys=[self.callbacks_key], args=[repr(_now()), repr(lease_s), limit])
        return [_text(job_id) for job_id in due]

    def schedule(self, job_id: str, at: float) -> None:
        self.redis.zadd(self.schedule_key, {job_id: at})

    def scheduled_at(self, job_id: str) -> float | None:
        score = self.redis.zscore(self.schedule_key, job_id)
        return None if score is None else float(score)

    def schedule_size(self) -> int:
        return int(self.redis.zcard(self.schedule_key))

    def raw_field(self, job_id: str, name: str) -> str | None:
        value = self.redis.hget(self.job_key(job_id), name)
        return None if value is None else _text(value)


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
