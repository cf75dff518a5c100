"""A fal account as the emulator plays it: a concurrency limit per key, fal's FIFO queue, a lock, revoked keys.

What fal documents, and what this module does with it:
- Concurrency (fal docs, model-apis/concurrency-limits): an account runs at most its limit of
  requests IN_PROGRESS; the rest wait IN_QUEUE and "are dispatched as soon as a slot frees up";
  "Requests are never rejected due to concurrency limits"; IN_QUEUE requests do not count. Each
  fal key is one account here (`--concurrency`, default 10; 0 = unlimited).
- Priority (fal docs, model-apis/inference/queue, `priority`): "A low-priority request sits behind
  all normal-priority requests ... and is only processed once no normal requests are waiting."
  The line is FIFO within a priority; `queue_position` counts the requests ahead in the caller's line.
- A locked account (fal FAQ: "When your credit balance drops below your account's lock threshold,
  your account is locked and API requests will be rejected"): 403 with
  `{"detail": "User is locked. Reason: Exhausted balance. Top up your balance at fal.ai/dashboard/billing."}`
  (the body users report, fal-ai/fal#1112, #1163). Only submits are refused: a status GET still
  answers 200 on a locked account (fal-ai/fal#1147), so status, result, cancel and the listing work.
- A revoked or unknown key: 401 `{"detail": "No user found for Key ID and Secret"}` (fal-ai/fal#1068),
  on every call.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

LOCKED_BODY = {"detail": "User is locked. Reason: Exhausted balance. Top up your balance at fal.ai/dashboard/billing."}
REVOKED_BODY = {"detail": "No user found for Key ID and Secret"}


def account_id(key: str) -> str:
    """The name an account goes by in counters and listings: never the key itself."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


class WaitingLine:
    """fal's queue: FIFO per priority, every normal request ahead of every low one."""

    def __init__(self) -> None:
        self.normal: deque[str] = deque()
        self.low: deque[str] = deque()

    def append(self, request_id: str, low: bool = False) -> int:
        """Add at the back of its priority; returns its 0-based position in the line."""
        (self.low if low else self.normal).append(request_id)
        return len(self) - 1 if low else len(self.normal) - 1

    def popleft(self) -> str:
        return self.normal.popleft() if self.normal else self.low.popleft()

    def remove(self, request_id: str) -> None:
        if request_id in self.normal:
            self.normal.remove(request_id)
        else:
            self.low.remove(request_id)

    def index(self, request_id: str) -> int:
        if request_id in self.normal:
            return self.normal.index(request_id)
        return len(self.normal) + self.low.index(request_id)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self.normal or request_id in self.low

    def __iter__(self) -> Iterator[str]:
        return itertools.chain(self.normal, self.low)

    def __len__(self) -> int:
        return len(self.normal) + len(self.low)


@dataclass
class Account:
    """One fal key's queue and what the tests and the bench read about it."""

    name: str
    line: WaitingLine = field(default_factory=WaitingLine)
    running: int = 0
    max_running: int = 0
    max_waiting: int = 0
    created: int = 0
    started: int = 0  # requests that reached a runner: the ones fal bills
    start_timeouts: int = 0  # X-Fal-Request-Timeout passed before a start: not billed
    locked_refusals: int = 0

    def view(self) -> dict[str, Any]:
        return {
            "in_queue": len(self.line), "in_progress": self.running, "max_in_progress": self.max_running,
            "max_in_queue": self.max_waiting, "created": self.created, "started": self.started,
            "start_timeouts": self.start_timeouts, "locked_refusals": self.locked_refusals,
        }  # fmt: skip


class Accounts:
    """Every account's waiting line, running count, lock and counters.

    Iterating, `len`, `in` and `remove` treat all lines as one, so callers that only need "is it
    waiting" or "how many wait" need not know which account a request belongs to.
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """Forget every line, lock, revoked key and counter; requests still running keep their slots
        (their tasks are being cancelled and give the slot back when they end)."""
        running = {name: account.running for name, account in getattr(self, "by_name", {}).items()}
        self.by_name: dict[str, Account] = {}
        self.where: dict[str, str] = {}  # waiting request id -> account name
        self.locked_until: dict[str | None, float] = {}  # None = every key of the emulator
        self.revoked: set[str] = set()
        self.running = 0
        self.max_running = 0
        self.max_waiting = 0
        self.start_timeouts = 0
        self.locked_refusals = 0
        self.revoked_refusals = 0
        for name, count in running.items():
            self.get(name).running = count
            self.running += count

    def get(self, name: str) -> Account:
        if name not in self.by_name:
            self.by_name[name] = Account(name)
        return self.by_name[name]

    # the waiting lines -------------------------------------------------------------
    def append(self, request_id: str, name: str, low: bool = False) -> int:
        account = self.get(name)
        position = account.line.append(request_id, low)
        self.where[request_id] = name
        account.created += 1
        return position

    def remove(self, request_id: str) -> None:
        name = self.where.pop(request_id)
        self.by_name[name].line.remove(request_id)

    def index(self, request_id: str) -> int:
        return self.by_name[self.where[request_id]].line.index(request_id)

    def next_to_start(self, limit: int) -> Iterator[str]:
        """Request ids to start now, each account up to its limit (0 = no limit), FIFO within each."""
        for account in self.by_name.values():
            while account.line and (limit <= 0 or account.running < limit):
                request_id = account.line.popleft()
                del self.where[request_id]
                yield request_id

    def note_peaks(self) -> None:
        """Record how many wait, once the scheduler has started what it could: a request that is
        started the moment it arrives never counts as waiting."""
        for account in self.by_name.values():
            account.max_waiting = max(account.max_waiting, len(account.line))
        self.max_waiting = max(self.max_waiting, len(self.where))

    def started(self, name: str) -> None:
        account = self.get(name)
        account.running += 1
        account.started += 1
        account.max_running = max(account.max_running, account.running)
        self.running += 1
        self.max_running = max(self.max_running, self.running)

    def ended(self, name: str) -> None:
        self.get(name).running -= 1
        self.running -= 1

    def timed_out(self, name: str) -> None:
        self.get(name).start_timeouts += 1
        self.start_timeouts += 1

    def __contains__(self, request_id: object) -> bool:
        return request_id in self.where

    def __iter__(self) -> Iterator[str]:
        return iter(list(self.where))

    def __len__(self) -> int:
        return len(self.where)

    # the lock and revoked keys -----------------------------------------------------------
    def lock(self, seconds: float, name: str | None = None) -> None:
        self.locked_until[name] = time.monotonic() + seconds

    def unlock(self, name: str | None = None) -> None:
        """A top-up: the lock ends at once (every lock when no account is named)."""
        if name is None:
            self.locked_until.clear()
        else:
            self.locked_until.pop(name, None)

    def is_locked(self, name: str) -> bool:
        now = time.monotonic()
        return any(self.locked_until.get(k, 0.0) > now for k in (None, name))

    def refuse_submit(self, name: str) -> bool:
        """True (and counted) when this account's submits are refused with fal's 403."""
        if not self.is_locked(name):
            return False
        self.get(name).locked_refusals += 1
        self.locked_refusals += 1
        return True

    def refuse_revoked(self, key: str) -> bool:
        """True (and counted) when this key was revoked: fal answers 401 to every call."""
        if key in self.revoked:
            self.revoked_refusals += 1
            return True
        return False

    # counters -------------------------------------------------------------------------------
    def counters(self) -> dict[str, Any]:
        return {
            "max_in_progress": self.max_running, "max_in_queue": self.max_waiting,
            "start_timeouts": self.start_timeouts, "locked_refusals": self.locked_refusals,
            "revoked_refusals": self.revoked_refusals,
            "locked": sorted(k or "*" for k, until in self.locked_until.items() if until > time.monotonic()),
            "accounts": {name: account.view() for name, account in self.by_name.items()},
        }  # fmt: skip
