"""The fal account's breaker, shared by every worker through Redis: a locked account (403 "User is
locked", exhausted balance) or a refused key (401) pauses submits instead of failing jobs.

While it is open, jobs stay `submitting` with us (no slot, no attempt counted, their deadline still
running) and show `waiting_on`; one probe submit per interval is let through, the interval doubling
while fal still refuses. The first submit fal accepts closes it, and the waiting jobs are looked at
again at once. One log line when it opens, one when it closes.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

import redis

from config.settings import Settings
from lipsync.keys import Keys

log = logging.getLogger("lipsync.account")

WAITING_ON = "the fal account"


@dataclass(frozen=True)
class AccountState:
    reason: str
    since: float
    probe_at: float
    interval: float

    @property
    def waiting_on(self) -> str:
        return f"{WAITING_ON} ({self.reason})"


def read_state(client: redis.Redis[bytes], keys: Keys, default_interval: float = 0.0) -> AccountState | None:
    """The open breaker as status, `stats` and metrics show it; None while fal accepts submits."""
    raw = client.hgetall(keys.fal_account)
    if not raw:
        return None
    fields = {k.decode(): v.decode() for k, v in raw.items()}
    return AccountState(
        reason=fields.get("reason", "refused"),
        since=float(fields.get("since", "0")),
        probe_at=float(fields.get("probe_at", "0")),
        interval=float(fields.get("interval", str(default_interval))),
    )


class AccountBreaker:
    def __init__(self, client: redis.Redis[bytes], keys: Keys, settings: Settings) -> None:
        self.redis, self.keys = client, keys
        self.probe_s, self.probe_max_s = settings.fal_account_probe_s, settings.fal_account_probe_max_s

    def state(self) -> AccountState | None:
        """The open breaker, or None while fal accepts submits."""
        return read_state(self.redis, self.keys, self.probe_s)

    def may_submit(self) -> tuple[float, AccountState | None]:
        """(0, state) when a submit may go now (state set: it is the interval's one probe);
        else (seconds to wait, state)."""
        state = self.state()
        if state is None:
            return 0.0, None
        now = time.time()
        if now < state.probe_at:
            return state.probe_at - now + random.uniform(0, 0.2 * state.interval), state
        # One probe per interval, whichever worker gets there first.
        if self.redis.set(self.keys.fal_account_probe, "1", nx=True, px=max(1, int(state.interval * 1000))):
            return 0.0, state
        return state.interval * random.uniform(0.5, 1.0), state

    def release_probe(self) -> None:
        """The probe's holder could not send (no slot, or the slot went to the job whose turn it is):
        the next job woken may probe at once instead of a whole interval later."""
        self.redis.delete(self.keys.fal_account_probe)

    def refused(self, reason: str) -> float:
        """fal refused a submit for the account: open the breaker (or back the probe off); returns
        how long the refused job waits."""
        now = time.time()
        state = self.state()
        if state is None:
            interval = self.probe_s
            self.redis.hset(
                self.keys.fal_account,
                mapping={
                    "reason": reason,
                    "since": repr(now),
                    "probe_at": repr(now + interval),
                    "interval": repr(interval),
                },
            )
            log.warning(
                "fal refuses the account: %s; submits pause (jobs wait, none fails for it) and a probe "
                "is sent every %.0f s or more until fal accepts again",
                reason,
                interval,
            )
            return interval
        if now >= state.probe_at:  # the probe was refused: back off
            interval = min(self.probe_max_s, state.interval * 2)
            self.redis.hset(
                self.keys.fal_account,
                mapping={"reason": reason, "probe_at": repr(now + interval), "interval": repr(interval)},
            )
            return interval
        return state.probe_at - now  # a submit sent before the breaker opened

    def accepted(self) -> None:
        """fal accepted a submit: close the breaker and look at the waiting jobs again now."""
        if not self.redis.exists(self.keys.fal_account):
            return
        pipe = self.redis.pipeline(transaction=True)
        pipe.hget(self.keys.fal_account, "since")
        pipe.delete(self.keys.fal_account, self.keys.fal_account_probe)
        since, deleted = pipe.execute()
        if not deleted:
            return  # another worker closed it
        waiting = self.redis.smembers(self.keys.status("submitting"))
        if waiting:
            now = time.time()
            self.redis.zadd(self.keys.schedule, {member: now for member in waiting}, xx=True)
        paused = time.time() - float(since) if since else 0.0
        log.warning("fal accepts submits again after %.0f s; %d waiting jobs resume", paused, len(waiting))
