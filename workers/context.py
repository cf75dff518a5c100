"""Expensive clients (Redis, boto3, httpx), created once per worker process, after the fork."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import redis

from config.settings import Settings, get_settings
from lipsync.account import AccountBreaker
from lipsync.admission import AdmissionControl
from lipsync.fal import FalQueueClient
from lipsync.fetcher import GuardedFetcher
from lipsync.jobs import Sender
from lipsync.jobstore import JobStore
from lipsync.keys import Keys
from lipsync.observe import observed_store
from lipsync.poller import FirstCheck
from lipsync.redis_client import connect
from lipsync.replication import ReplicaAck
from lipsync.storage import Storage


@dataclass
class Context:
    settings: Settings
    redis: redis.Redis[bytes]
    store: JobStore
    admission: AdmissionControl
    storage: Storage
    fetcher: GuardedFetcher
    fal: FalQueueClient
    send: Sender
    first_check: FirstCheck
    account: AccountBreaker


def build_context(settings: Settings, send: Sender | None = None) -> Context:
    client = connect(settings.redis_url)
    if send is None:
        from lipsync.jobs import celery_sender
        from workers.app import app

        send = celery_sender(app)
    return Context(
        settings=settings,
        redis=client,
        store=observed_store(client, settings.key_prefix, ack=ReplicaAck.from_settings(settings)),
        admission=AdmissionControl.from_settings(client, settings),
        storage=Storage(settings),
        fetcher=GuardedFetcher.from_settings(settings),
        fal=FalQueueClient.from_settings(settings),
        send=send,
        first_check=FirstCheck(client, Keys(settings.key_prefix), settings),
        account=AccountBreaker(client, Keys(settings.key_prefix), settings),
    )


_context: Context | None = None
_context_pid: int | None = None
# The threads pool's first tasks arrive together: without the lock each built its own clients.
_context_lock = threading.Lock()


def get_context() -> Context:
    """This process's context; a forked child builds its own rather than share sockets."""
    global _context, _context_pid
    if _context is None or _context_pid != os.getpid():
        with _context_lock:
            if _context is None or _context_pid != os.getpid():
                _context = build_context(get_settings())
                _context_pid = os.getpid()
    return _context
