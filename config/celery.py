"""Celery configuration for this workload, each choice with its reason.

The job store and its durable schedule (Redis) are the source of truth; the broker only
carries "look at job X now". So a lost or duplicated message costs a little latency, never
a job or a second fal request.

What Redis itself must be (checked at worker start by `workers.preflight`, which warns):
- `maxmemory-policy noeviction`: under memory pressure Redis then refuses writes (the task
  fails and is retried) instead of silently evicting a job record, a lease or a queue.
- `appendonly yes` with `appendfsync always`: the submit claim is written before the POST to
  fal; with `everysec` a crash of Redis can forget the last second, claim included, and a
  rerun would POST again (paid twice). `always` costs an fsync per write, which this
  workload (a few writes per job per second, not thousands) affords. See docs/reliability.md.

Shutdown: SIGTERM is Celery's warm shutdown: no new messages, tasks in flight run to their
end, reserved ones go back to the queue (tests/chaos/test_shutdown.py). Give the process
manager a grace period longer than a transfer; if it kills sooner, the job's lease lapses
and the schedule sends it again.
"""

from __future__ import annotations

from typing import Any

from config.broker import broker_options
from config.settings import Settings
from lipsync.lifecycle import TASK_QUEUES, TASK_STEPS

__all__ = ["TASK_QUEUES", "celery_config"]


def celery_config(settings: Settings) -> dict[str, Any]:
    return {
        # broker_url, the transport and its options, by the URL's scheme (Redis or RabbitMQ).
        **broker_options(settings),
        # Task results are not used: the job record is the result. No backend, no result keys.
        "result_backend": None,
        "task_ignore_result": True,
        # Messages carry a job id and nothing else; JSON only (no pickle from the broker).
        "task_serializer": "json",
        "accept_content": ["json"],
        # Routes and time limits come from the lifecycle table (`lipsync.lifecycle.STEPS`).
        "task_routes": {step.task_name: {"queue": step.queue} for step in TASK_STEPS},
        "task_default_queue": "api",
        "task_create_missing_queues": True,
        # Ack after the task ran, and hand the message back if the worker process dies, so a
        # kill -9 mid-stage re-runs the stage (each stage is idempotent under the job lease).
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # One message reserved per process: a long transfer must not sit on others' work.
        "worker_prefetch_multiplier": 1,
        # Time limits: api tasks are single HTTP calls; transfer tasks move media. The soft
        # limit comes first, so a step can still fail the job in words.
        "task_annotations": {
            step.task_name: {
                "time_limit": step.time_limit_s(settings) + 60,
                "soft_time_limit": step.time_limit_s(settings),
            }
            for step in TASK_STEPS
        },
        # Task events only while someone watches: Flower turns them on itself (every 5 s it asks
        # the workers to); `LIPSYNC_TASK_EVENTS=1` sends them from a worker's start. Never the
        # "sent" event: it costs a Redis command per message in every producer.
        "worker_send_task_events": settings.task_events,
        "task_send_sent_event": False,
        "event_queue_expires": 60,
        "event_queue_ttl": 5,
        # Recycle prefork children now and then: PyAV/FFmpeg allocations fragment memory.
        "worker_max_tasks_per_child": 500,
        "worker_hijack_root_logger": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "timezone": "UTC",
    }
