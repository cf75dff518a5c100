"""The Celery app: configuration from `config.celery`, tasks from `workers.tasks`.

Each worker's main process also runs the dispatcher, which turns due entries of the durable
schedule into task messages (see `workers.dispatcher`), and serves the job metrics (`lipsync.metrics`).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import worker_init, worker_process_init, worker_ready, worker_shutdown

from config.celery import celery_config
from config.logging import configure_logging
from config.settings import get_settings

app = Celery("lipsync")
app.config_from_object(celery_config(get_settings()))
app.autodiscover_tasks(["workers"], related_name="tasks", force=True)

_dispatcher: Any = None
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
    import redis

    from lipsync import metrics
    from lipsync.jobstore import JobStore

    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
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


@worker_ready.connect
def _start_dispatcher(**_: Any) -> None:
    global _dispatcher
    settings = get_settings()
    configure_logging(settings)
    from workers.preflight import check_redis

    check_redis(settings)
    if not settings.run_dispatcher:
        return
    from workers.dispatcher import Dispatcher

    _dispatcher = Dispatcher(app, settings)
    _dispatcher.start()


@worker_shutdown.connect
def _stop_dispatcher(**_: Any) -> None:
    if _dispatcher is not None:
        _dispatcher.stop()


@worker_shutdown.connect
def _remove_metrics_files(**_: Any) -> None:
    # The values live as long as the worker: Prometheus has scraped them, a restart starts anew.
    if _metrics_dir is not None and not get_settings().metrics_dir:
        shutil.rmtree(_metrics_dir, ignore_errors=True)


@worker_process_init.connect
def _child_logging(**_: Any) -> None:
    configure_logging(get_settings())
