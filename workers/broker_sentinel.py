"""kombu's Redis Sentinel transport with the same fix as `workers.broker`: a lost broker
connection (here: the master killed before Sentinel promotes its replica) must not end the
worker. Selected by `broker_transport` when the broker URL is a Sentinel URL
(`lipsync.sentinel.celery_broker_options(url, sentinel_transport=TRANSPORT)`).
"""

from __future__ import annotations

from kombu.transport import redis as kombu_redis

from workers.broker import QoS

TRANSPORT = "workers.broker_sentinel:SentinelTransport"


class SentinelChannel(kombu_redis.SentinelChannel):
    QoS = QoS


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel
