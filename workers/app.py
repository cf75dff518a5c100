"""The Celery app: configuration from `config.celery`, tasks from `workers.tasks`.

Each worker's main process also runs the dispatcher, the safety net that turns due entries of
the durable schedule into task messages (see `workers.dispatcher`); a worker consuming the `api`
queue runs the poller too, which checks jobs at fal (see `lipsync.poller`); and each serves the
job metrics (`lipsync.metrics`).
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import worker_init, worker_process_init, worker_ready, worker_shutdown

from config.celery import celery_config
from config.logging import configure_logging
from config.settings import get_settings
from lipsync.errors import LipsyncError

app = Celery("lipsync")
try:
    app.config_from_object(celery_config(get_settings()))
except LipsyncError as exc:  # a bad LIPSYNC_* value: `celery -A workers.app` would print a traceback
    print(f"lipsync worker: cannot start: {exc}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None
app.autodiscover_tasks(["workers"], related_name="tasks", force=True)

_dispatcher: Any = None
_poller: Any = None
_metrics_dir: Path | None = None


@worker_init.connect
def _refuse_to_start_misconfigured(**_: Any) -> None:
    from workers.preflight import refuse_to_start_misconfigured

    refuse_to_start_misconfigured(get_settings())


@worker_init.connect
def _serve_metrics(**_: Any) -> None:
    """Job metrics on http://METRICS_ADDRESS:METRICS_PORT/metrics, set up before the pool forks."""
    settings = get_settings()
    configure_logging(settings)
    if not settings.metrics_port:
        return
    from lipsync import metrics
    from lipsync.jobstore import JobStore
    from lipsync.redis_client import connect

    client = connect(settings.redis_url, socket_timeout_s=5)
    path = metrics.multiprocess_dir(settings.metrics_port, settings.metrics_dir)
    try:
        metrics.serve(JobStore(client, settings.key_prefix), settings.metrics_port, settings.metrics_address, path)
        global _metrics_dir
        _metrics_dir = path
        logging.getLogger("lipsync.metrics").info(
            "metrics: serving http://%s:%d/metrics", settings.metrics_address, settings.metrics_port
        )
    except OSError as exc:  # port taken (another worker on this host): work on, unmeasured
        logging.getLogger("lipsync.metrics").warning(
            "metrics: cannot listen on %s:%d (%s); set LIPSYNC_METRICS_PORT per worker",
            settings.metrics_address,
            settings.metrics_port,
            exc,
        )


def _consumes(sender: Any, queue: str) -> bool:
    try:
        consumed = sender.app.amqp.queues.consume_from
    except AttributeError:  # not a consumer we know: assume it does
        return True
    return consumed is None or queue in set(consumed)  # None: every queue


@worker_ready.connect
def _start_dispatcher(sender: Any = None, **_: Any) -> None:
    global _dispatcher, _poller
    settings = get_settings()
    configure_logging(settings)
    from workers.preflight import check_redis

    check_redis(settings)
    if not _forks(sender):
        _build_context()
    # One dispatcher and one poller per api worker: claims are atomic, so any number may run;
    # the api worker is the one every deployment has, and the one whose work they feed.
    if not settings.run_dispatcher or not _consumes(sender, "api"):
        return
    from lipsync.jobs import celery_sender
    from lipsync.poller import Poller
    from workers.dispatcher import Dispatcher

    _dispatcher = Dispatcher(app, settings)
    _dispatcher.start()
    _poller = Poller(settings, celery_sender(app))
    _poller.start()


@worker_shutdown.connect
def _stop_dispatcher(**_: Any) -> None:
    if _poller is not None:
        _poller.stop()
    if _dispatcher is not None:
        _dispatcher.stop()


@worker_shutdown.connect
def _remove_metrics_files(**_: Any) -> None:
    # The values live as long as the worker: Prometheus has scraped them, a restart starts anew.
    if _metrics_dir is not None and not get_settings().metrics_dir:
        shutil.rmtree(_metrics_dir, ignore_errors=True)


@worker_process_init.connect
def _child_setup(**_: Any) -> None:
    configure_logging(get_settings())
    _build_context()  # a prefork child's own clients, before its first task


def _forks(consumer: Any) -> bool:
    """Whether the worker's pool runs tasks in child processes (each builds its own context)."""
    return type(getattr(consumer, "pool", None)).__module__.startswith("celery.concurrency.prefork")


def _build_context() -> None:
    """The task context (Redis, boto3 and httpx clients: ~0.2 s of CPU) built before the first
    task, not by it: the first burst of tasks does not wait while one thread builds it."""
    from workers.context import get_context

    get_context()
