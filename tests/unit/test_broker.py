"""The broker is chosen by the URL's scheme; anything else is refused in one line."""

from __future__ import annotations

import pytest

from config.broker import BrokerUrlError, broker_kind, broker_options
from config.celery import celery_config
from config.settings import Settings


@pytest.mark.parametrize(
    ("url", "kind"),
    [("redis://localhost:6379/0", "redis"), ("rediss://cache:6380/1", "redis"),
     ("amqp://guest:guest@127.0.0.1:5672/vhost", "amqp"), ("amqp://guest:guest@127.0.0.1:5672//", "amqp"),
     ("amqps://u:p@mq.example.com/prod", "amqp"), ("pyamqp://u:p@mq/", "amqp"),
     ("sentinel://s1:26379;sentinel://s2:26379/0?master_name=m", "redis")],
)  # fmt: skip
def test_the_scheme_chooses_the_broker(url: str, kind: str) -> None:
    assert broker_kind(url) == kind


@pytest.mark.parametrize("url", ["sqs://", "localhost:6379", "", "memory://"])
def test_another_broker_is_refused_in_words_without_the_password(url: str) -> None:
    with pytest.raises(BrokerUrlError, match="must start with redis://, sentinel:// or amqp://"):
        broker_kind(url)
    with pytest.raises(BrokerUrlError) as caught:
        broker_kind("sqs://key:hunter2-secret@queue")
    assert "hunter2" not in caught.value.message


def test_redis_keeps_its_transport_and_rabbitmq_gets_quorum_queues_and_confirms() -> None:
    redis = celery_config(Settings(broker_url="redis://localhost:6379/0"))
    assert redis["broker_transport"] == "workers.broker:Transport"
    assert redis["broker_transport_options"]["visibility_timeout"] >= 3600
    assert "task_queues" not in redis

    rabbit = celery_config(Settings(broker_url="amqp://guest:guest@127.0.0.1:5672/lipsync"))
    assert "broker_transport" not in rabbit and rabbit["broker_url"].startswith("amqp://")
    assert rabbit["broker_transport_options"]["confirm_publish"] is True
    assert "visibility_timeout" not in rabbit["broker_transport_options"]
    assert rabbit["task_default_queue_type"] == "quorum" and rabbit["worker_detect_quorum_queues"] is True
    assert rabbit["task_acks_late"] is True and rabbit["task_reject_on_worker_lost"] is True
    assert {q.name for q in rabbit["task_queues"]} == {"transfer", "api"}
    assert broker_options(Settings(broker_url="amqp://x@y//"))["broker_heartbeat"] > 0


def test_a_sentinel_broker_gets_kombus_sentinel_form_and_keeps_the_redis_options() -> None:
    from workers.broker_sentinel import TRANSPORT

    url = "sentinel://:secret@s1:26379;sentinel://s2:26380/2?master_name=lipsync&sentinel_password=sp"
    options = celery_config(Settings(broker_url=url))
    assert options["broker_transport"] == TRANSPORT
    assert options["broker_url"] == "sentinel://:secret@s1:26379/2;sentinel://:secret@s2:26380/2"
    transport = options["broker_transport_options"]
    assert transport["master_name"] == "lipsync" and transport["sentinel_kwargs"] == {"password": "sp"}
    assert transport["visibility_timeout"] >= 3600 and transport["socket_timeout"] == 10


def test_producers_send_no_task_sent_events_so_flower_gets_no_series_per_process() -> None:
    from producers.api import LipsyncClient

    client = LipsyncClient(Settings(broker_url="redis://127.0.0.1:1/0", redis_url="redis://127.0.0.1:1/0"))
    try:
        assert client._celery.conf.task_send_sent_event is False
    finally:
        client.close()
