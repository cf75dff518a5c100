"""The broker settings, chosen by the scheme of `LIPSYNC_BROKER_URL`: Redis or RabbitMQ.

The broker only carries "look at job X now"; the job store and its durable schedule stay in
Redis whatever the broker is (`LIPSYNC_REDIS_URL`). So the choice changes how messages travel,
never what a job is.

- `redis://`, `rediss://`: kombu's Redis transport with this project's fix for a Redis restart
  (`workers.broker`), unacked messages handed back after `visibility_timeout`.
- `sentinel://h1:26379;sentinel://h2:26379/0?master_name=NAME`: the same Redis transport behind
  Sentinel (kombu's Sentinel transport, with the same fix: `workers.broker_sentinel`); it asks
  the Sentinels for the master again on reconnect, so the workers follow a failover.
- `amqp://`, `amqps://`, `pyamqp://`: RabbitMQ, as Celery's docs recommend it for no message
  loss: quorum queues (replicated with Raft, durable, and each message confirmed by the
  broker before the publisher goes on: `confirm_publish`), acks late (already on in
  `config.celery`), per-consumer prefetch (quorum queues refuse a global QoS). RabbitMQ
  redelivers an unacked message as soon as its consumer's connection closes, so there is no
  visibility timeout; its `consumer_timeout` (30 min by default) must outlast the longest task.

Anything else is refused in one line at import, before a worker or producer touches it.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from kombu.entity import Queue

from config.settings import Settings
from lipsync.errors import LipsyncError
from lipsync.sentinel import SENTINEL_SCHEME, celery_broker_options

REDIS_SCHEMES = frozenset({"redis", "rediss"})
AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp"})
# kombu's Sentinel transport with the workers' broker fix (`workers.broker_sentinel.TRANSPORT`).
SENTINEL_TRANSPORT = "workers.broker_sentinel:SentinelTransport"
# The queues every step is routed to (`workers.runner.QUEUE_OF`): declared here once, so that a
# producer and a worker declare each with the same arguments (RabbitMQ refuses a mismatch).
QUEUE_NAMES = ("transfer", "api")


class BrokerUrlError(LipsyncError):
    """LIPSYNC_BROKER_URL names a broker this project does not run on."""


def broker_kind(url: str) -> str:
    """The kind of broker a URL names, "redis" or "amqp"; `BrokerUrlError` in words for anything else."""
    scheme = urlsplit(url).scheme.lower()
    if scheme in REDIS_SCHEMES or scheme == SENTINEL_SCHEME:
        return "redis"
    if scheme in AMQP_SCHEMES:
        return "amqp"
    shown = f"{scheme}://" if scheme else repr(url.split("@")[-1])
    raise BrokerUrlError(
        f"LIPSYNC_BROKER_URL must start with redis://, sentinel:// or amqp:// (RabbitMQ); "
        f"{shown} is not a broker this runs on"
    )


def broker_options(settings: Settings) -> dict[str, Any]:
    """Every broker_* setting (and the queue declarations the broker needs) for `celery_config`."""
    common: dict[str, Any] = {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,  # ride out a broker restart instead of exiting
        "broker_pool_limit": 20,
    }
    if broker_kind(settings.broker_url) == "amqp":
        return {**common, **_rabbitmq_options()}
    return {**common, **_redis_options(settings)}


def _redis_options(settings: Settings) -> dict[str, Any]:
    from lipsync.lifecycle import transfer_limit_s

    transfer_limit = transfer_limit_s(settings)
    options: dict[str, Any] = {
        # Unacked messages come back after this long on Redis. Longer than the longest task,
        # so a slow transfer is not run twice; a crashed worker's job is picked up much
        # sooner by the durable schedule (its lease lapses in poll_lease_s/transfer_lease_s).
        "broker_transport_options": {
            "visibility_timeout": max(3600, transfer_limit * 2),
            "socket_timeout": 10,
            "socket_connect_timeout": 5,
            "health_check_interval": 30,
        },
        # kombu's Redis transport with a fix for a Redis restart that otherwise ends the
        # worker ("Unrecoverable error" while handing back unacked messages): see workers.broker.
        "broker_transport": "workers.broker:Transport",
    }
    if urlsplit(settings.broker_url).scheme.lower() == SENTINEL_SCHEME:
        # The Sentinels' options (master name...) join the transport options above; the URL and
        # the transport become kombu's Sentinel ones.
        sentinel = celery_broker_options(settings.broker_url, sentinel_transport=SENTINEL_TRANSPORT)
        options["broker_transport_options"].update(sentinel["broker_transport_options"])
        options["broker_url"] = sentinel["broker_url"]
        options["broker_transport"] = sentinel["broker_transport"]
    return options


def _rabbitmq_options() -> dict[str, Any]:
    quorum = {"x-queue-type": "quorum"}
    return {
        "task_queues": tuple(
            Queue(name, routing_key=name, queue_arguments=quorum)  # type: ignore[no-untyped-call]
            for name in QUEUE_NAMES
        ),
        "task_default_queue_type": "quorum",
        # Quorum queues do not support a global prefetch: Celery then sets it per consumer.
        "worker_detect_quorum_queues": True,
        "broker_transport_options": {
            # The publish returns only once RabbitMQ has the message (on a quorum of replicas):
            # a producer that was told "sent" did not lose it in a socket buffer.
            "confirm_publish": True,
            # A broker that is down makes `send_task` fail after this long, not hang.
            "max_retries": 3,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 2,
        },
        # Missed heartbeats find a dead connection (a RabbitMQ node gone) within a minute.
        "broker_heartbeat": 30,
        "broker_connection_timeout": 5,
    }
