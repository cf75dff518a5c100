"""Admission to fal, shared by every worker through Redis: a cap on jobs in flight and a submit rate.

One Lua script decides both, so two workers can never both take the last slot.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

# Token bucket (capacity = one second of rate, at least 1) plus a set of jobs in flight.
_ADMIT = """
local inflight, bucket = KEYS[1], KEYS[2]
local job, cap, rate, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if redis.call('SISMEMBER', inflight, job) == 1 then return {1, '0'} end
if redis.call('SCARD', inflight) >= cap then return {0, '1.0'} end
local burst = math.max(1, rate)
local tokens = tonumber(redis.call('HGET', bucket, 'tokens') or burst)
local last = tonumber(redis.call('HGET', bucket, 'at') or now)
tokens = math.min(burst, tokens + math.max(0, now - last) * rate)
if tokens < 1 then
  redis.call('HSET', bucket, 'tokens', tostring(tokens), 'at', tostring(now))
  return {0, tostring((1 - tokens) / rate)}
end
redis.call('HSET', bucket, 'tokens', tostring(tokens - 1), 'at', tostring(now))
redis.call('SADD', inflight, job)
return {1, '0'}
"""


@dataclass(frozen=True)
class Admission:
    admitted: bool
    retry_after: float


class AdmissionControl:
    def __init__(
        self, client: redis.Redis[bytes], *, prefix: str, max_in_flight: int, submits_per_second: float
    ) -> None:
        self.redis = client
        self.inflight_key = f"{prefix}:inflight"
        self.bucket_key = f"{prefix}:submit-rate"
        self.max_in_flight = max_in_flight
        self.submits_per_second = submits_per_second
        self._admit = client.register_script(_ADMIT)

    def admit(self, job_id: str) -> Admission:
        admitted, retry_after = self._admit(
            keys=[self.inflight_key, self.bucket_key],
            args=[job_id, self.max_in_flight, self.submits_per_second, repr(time.time())],
        )
        return Admission(bool(int(admitted)), float(retry_after))

    def release(self, job_id: str) -> None:
        self.redis.srem(self.inflight_key, job_id)

    def in_flight(self) -> int:
        return int(self.redis.scard(self.inflight_key))
