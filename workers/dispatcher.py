"""The dispatcher: the safety net of the Celery steps, and the sender of callbacks.

Steps hand a job on by sending its next task at once; its entry in the `schedule` is the
safety net for a message or a worker that was lost. This thread, in each worker's main
process, claims due entries (atomically: any number of dispatchers run side by side) and
sends the task the lifecycle table names for the job's status. Jobs at fal are not its
business: they are in the `waiting` schedule, which the poller works through.
"""

from __future__ import annotations

import logging
import threading
import time

from celery import Celery

from config.settings import Settings
from lipsync.lifecycle import next_step, step
from lipsync.observe import observed_store
from lipsync.redis_client import connect

log = logging.getLogger("lipsync.dispatcher")
# How often the jobs not ended are compared with the schedules (`JobStore.reschedule_lost`).
SWEEP_EVERY_S = 30.0


class Dispatcher:
    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.store = observed_store(connect(settings.redis_url), settings.key_prefix)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lipsync-dispatcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        # Nothing due: sleep until the next entry is due, between the dispatch interval and 4x it
        # (an entry written meanwhile, like a short admission wait, is late by at most that).
        longest = 4 * self.settings.dispatch_interval_s
        while not self._stop.is_set():
            try:
                self.sweep()
                sent = self.dispatch_once() + self.dispatch_callbacks()
            except Exception as exc:  # Redis restarting, broker away: keep trying, quietly
                log.warning("dispatcher: %s: %s", type(exc).__name__, exc)
                self._stop.wait(1.0)
                continue
            if sent < self.settings.dispatch_batch:
                until = min(self._next_due, self._next_callback)
                pause = min(longest, max(self.settings.dispatch_interval_s, until - time.time()))
                self._stop.wait(pause)

    _next_due = float("inf")
    _next_callback = float("inf")
    _next_sweep = 0.0

    def sweep(self) -> list[str]:
        """Now and then, put back in the schedule the jobs a Redis failover left out of it."""
        if time.monotonic() < self._next_sweep:
            return []
        self._next_sweep = time.monotonic() + SWEEP_EVERY_S
        lost = self.store.reschedule_lost()
        if lost:
            log.warning("dispatcher: %d job(s) not ended were in no schedule (a Redis failover?): due now", len(lost))
        return lost

    def dispatch_once(self) -> int:
        """Send one task for each due job; returns how many entries were claimed."""
        settings = self.settings
        due, next_due = self.store.claim_due_or_next(settings.poll_lease_s, settings.dispatch_batch)
        self._next_due = float("inf") if next_due is None else next_due
        if not due:
            return 0
        statuses = self.store.statuses(due)
        with self.app.producer_or_acquire() as producer:
            for job_id, status in statuses.items():
                following = None if status is None else next_step(status)
                if following is None or following.queue is None:
                    # Ended, gone, or at fal (the poller's): not the schedule's any more.
                    self.store.redis.zrem(self.store.schedule_key, job_id)
                    if following is not None:
                        self.store.redis.zadd(self.store.waiting_key, {job_id: time.time()}, nx=True)
                    continue
                if following.queue == "transfer":
                    # A transfer may wait behind big files in its queue; don't resend it soon.
                    self.store.schedule(job_id, time.time() + following.lease_s(settings))
                self.app.send_task(following.task_name, args=[job_id], queue=following.queue, producer=producer)
        return len(due)

    def dispatch_callbacks(self) -> int:
        """Send one `callback` task for each job whose callback is due (see `workers.callback`)."""
        due, next_due = self.store.claim_due_or_next(
            self.settings.poll_lease_s, self.settings.dispatch_batch, self.store.callbacks_key
        )
        self._next_callback = float("inf") if next_due is None else next_due
        if due:
            callback = step("callback")
            with self.app.producer_or_acquire() as producer:
                for job_id in due:
                    self.app.send_task(callback.task_name, args=[job_id], queue=callback.queue, producer=producer)
        return len(due)
