"""kombu's Redis transport with one fix: a Redis restart must not kill the worker.

When the broker connection drops while acks_late tasks are in flight, Celery's consumer
(5.x) collects the broken connection and then closes its channel; closing tries to hand the
unacknowledged messages back through that connection, which is gone, and the
AttributeError it raises ends the worker ("Unrecoverable error"). A task that finishes after
the reconnect acks through the same dead channel, with the same end. The crash suite found
both with `kill -9` of redis-server mid-batch. Here both give up quietly instead: those
messages stay in kombu's unacked hash (restored after the visibility timeout, then skipped
as their jobs have moved on), and their jobs do not wait for that, because the durable
schedule sends them again when their lease lapses. Selected by `broker_transport` in
`config.celery`.
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import redis as kombu_redis

log = logging.getLogger("lipsync.broker")


class QoS(kombu_redis.QoS):
    def restore_unacked(self, client: Any = None) -> None:
        try:
            super().restore_unacked(client)  # type: ignore[no-untyped-call]
        except AttributeError:
            log.warning(
                "broker connection lost with %d unacknowledged message(s); their jobs are sent "
                "again by the schedule when their leases lapse",
                len(self._delivered),
            )
            self._delivered.clear()

    def ack(self, delivery_tag: str) -> None:
        try:
            super().ack(delivery_tag)  # type: ignore[no-untyped-call]
        except AttributeError:
            self._dead_channel("ack", delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        try:
            super().reject(delivery_tag, requeue=requeue)  # type: ignore[no-untyped-call]
        except AttributeError:
            self._dead_channel("reject", delivery_tag)

    def _dead_channel(self, operation: str, delivery_tag: str) -> None:
        self._delivered.pop(delivery_tag, None)
        log.warning(
            "could not %s a message: its broker connection was lost; its job is covered by the schedule", operation
        )


class Channel(kombu_redis.Channel):
    QoS = QoS


class Transport(kombu_redis.Transport):
    Channel = Channel
