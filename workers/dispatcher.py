"""The dispatcher: turns due entries of the durable schedule into task messages.

It runs as a thread in each worker's main process. Claiming is atomic (a Lua script pushes
each claimed entry one lease ahead), so any number of dispatchers can run side by side; a
job whose message or worker was lost becomes due again when its lease lapses.
"""

from __future__ import annotations

import logging
import threading
import time

import redis
from celery import Celery

from config.settings import Settings
from lipsync.jobstore import JobStore
from workers.runner import NEXT_TASK, QUEUE_OF

log = logging.getLogger("lipsync.dispatcher")


class Dispatcher:
    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.store = JobStore(
            redis.Redis.from_url(settings.redis_url, socket_timeout=10, socket_connect_timeout=5),
            settings.key_prefix,
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lipsync-dispatcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                sent = self.dispatch_once() + self.dispatch_callbacks()
            except Exception as exc:  # Redis restarting, broker away: keep trying, quietly
                log.warning("dispatcher: %s: %s", type(exc).__name__, exc)
                self._stop.wait(1.0)
                continue
            if sent < self.settings.dispatch_batch:
                self._stop.wait(self.settings.dispatch_interval_s)

    def dispatch_once(self) -> int:
        """Send one task for each due job; returns how many entries were claimed."""
        settings = self.settings
        due = self.store.claim_due(settings.poll_lease_s, settings.dispatch_batch)
        if not due:
            return 0
        statuses = self.store.statuses(due)
        with self.app.producer_or_acquire() as producer:
            for job_id, status in statuses.items():
                if status is None or status.terminal:
                    self.store.redis.zrem(self.store.schedule_key, job_id)
                    continue
                task = NEXT_TASK[status]
                if QUEUE_OF[task] == "transfer":
                    # A transfer may wait behind big files in its queue; don't resend it soon.
                    self.store.schedule(job_id, time.time() + settings.transfer_lease_s)
                self.app.send_task(f"lipsync.{task}", args=[job_id], queue=QUEUE_OF[task], producer=producer)
        return len(due)

    def dispatch_callbacks(self) -> int:
        """Send one `callback` task for each job whose callback is due (see `workers.callback`)."""
        due = self.store.claim_due_callbacks(self.settings.poll_lease_s, self.settings.dispatch_batch)
        if due:
            with self.app.producer_or_acquire() as producer:
                for job_id in due:
                    self.app.send_task("lipsync.callback", args=[job_id], queue="api", producer=producer)
        return len(due)
