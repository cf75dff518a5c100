"""The Sentinel URL form (lipsync.sentinel): what it accepts, what kombu gets, and the errors."""

from __future__ import annotations

import pytest
import redis

from lipsync.replication import acknowledge
from lipsync.sentinel import (
    RedisURLError,
    SentinelAddress,
    celery_broker_options,
    is_sentinel_url,
    parse_sentinel_url,
    redis_from_url,
)

URL = "sentinel://:s3cret@h1:26379/2;sentinel://h2:26380;sentinel://h3?master_name=mymaster"


def test_three_sentinels_master_name_db_and_password() -> None:
    address = parse_sentinel_url(URL)
    assert address == SentinelAddress(
        sentinels=(("h1", 26379), ("h2", 26380), ("h3", 26379)),
        master_name="mymaster",
        db=2,
        password="s3cret",
    )
    assert "s3cret" not in repr(address)


def test_options_and_db_may_be_written_on_any_address() -> None:
    address = parse_sentinel_url(
        "sentinel://h1:1;sentinel://h2:2/3?master_name=m&min_other_sentinels=1&sentinel_password=p%40ss"
    )
    assert (address.db, address.master_name, address.min_other_sentinels) == (3, "m", 1)
    assert address.sentinel_password == "p@ss"
    assert address.sentinel_kwargs({"socket_timeout": 5, "db": 3}) == {"socket_timeout": 5, "password": "p@ss"}


def test_celery_gets_kombus_own_url_form_and_the_master_name_as_a_transport_option() -> None:
    options = celery_broker_options(URL, sentinel_transport="workers.broker_sentinel:SentinelTransport")
    assert options == {
        "broker_url": "sentinel://:s3cret@h1:26379/2;sentinel://:s3cret@h2:26380/2;sentinel://:s3cret@h3:26379/2",
        "broker_transport": "workers.broker_sentinel:SentinelTransport",
        "broker_transport_options": {"master_name": "mymaster"},
    }
    with_sentinel_auth = celery_broker_options("sentinel://h1?master_name=m&sentinel_password=x&min_other_sentinels=2")
    assert with_sentinel_auth["broker_transport"] == "sentinel"
    assert with_sentinel_auth["broker_transport_options"] == {
        "master_name": "m",
        "sentinel_kwargs": {"password": "x"},
        "min_other_sentinels": 2,
    }


def test_a_plain_url_is_left_as_it_is() -> None:
    assert celery_broker_options("redis://localhost:6379/0") == {"broker_url": "redis://localhost:6379/0"}
    assert not is_sentinel_url("redis://localhost:6379/0")
    assert is_sentinel_url(" SENTINEL://h1")
    client = redis_from_url("redis://localhost:6379/4", socket_timeout=1)
    assert client.connection_pool.connection_kwargs["db"] == 4


def test_sentinel_client_asks_the_sentinels_for_the_master() -> None:
    client = redis_from_url(URL, socket_timeout=2)
    pool = client.connection_pool
    assert isinstance(pool, redis.sentinel.SentinelConnectionPool)
    assert pool.service_name == "mymaster"
    assert pool.connection_kwargs["db"] == 2 and pool.connection_kwargs["password"] == "s3cret"
    sentinels = pool.sentinel_manager.sentinels
    assert [s.connection_pool.connection_kwargs["port"] for s in sentinels] == [26379, 26380, 26379]
    # The Sentinels get the socket timeouts, not the master's password.
    assert (
        "password" not in sentinels[0].connection_pool.connection_kwargs
        or not (sentinels[0].connection_pool.connection_kwargs["password"])
    )


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sentinel://h1;redis://h2?master_name=m", "must start with sentinel://"),
        ("sentinel://h1/zero?master_name=m", "must be a database number"),
        ("sentinel://h1/1;sentinel://h2/2?master_name=m", "two different database numbers"),
        ("sentinel://h1?master_name=m&master=x", "unknown option 'master'"),
        ("sentinel://:a@h1;sentinel://:b@h2?master_name=m", "two different sets of credentials"),
        ("sentinel://h1:notaport?master_name=m", "not a valid URL"),
        ("sentinel://h1?master_name=m&min_other_sentinels=many", "must be a whole number"),
        ("sentinel://h1:26379;sentinel://h2:26379", "no master name: add \\?master_name="),
        (";", "names no Sentinel"),
    ],
)
def test_bad_sentinel_url_one_clear_line(url: str, message: str) -> None:
    with pytest.raises(RedisURLError, match=message) as raised:
        parse_sentinel_url(url)
    assert "\n" not in str(raised.value)


def test_bad_scheme_names_the_url_without_its_password() -> None:
    with pytest.raises(RedisURLError) as raised:
        redis_from_url("http://user:hunter2@h1:6379/0")
    assert "hunter2" not in str(raised.value) and "***" in str(raised.value)


def test_acknowledge_bounded_wait_only() -> None:
    client = redis.Redis(single_connection_client=False)
    with pytest.raises(ValueError, match="timeout_ms must be more than 0"):
        acknowledge(client.pipeline(transaction=False), replicas=1, timeout_ms=0, policy="refuse")
    with pytest.raises(ValueError, match="'sometimes' is not a valid AckPolicy"):
        acknowledge(client.pipeline(transaction=False), replicas=1, timeout_ms=10, policy="sometimes")
