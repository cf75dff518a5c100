"""Secrets stay secret: a batch with a recognisable fake FAL_KEY and fake S3 credentials, then a
search for them (and for presigned URL signatures) in everything an operator or attacker
could read: worker and Flower logs, every key in Redis (job records, the schedule, and the
broker's own: queued kombu messages, headers and base64 bodies decoded, unacked, bindings),
and Flower's API, which must itself refuse anyone without the password.

Broker messages are read while they sit in their queue: first the producer's (no worker
running), then the workers' own (the transfer worker running, the api worker not yet). A
scan after the queues drain would find nothing to read, and prove nothing.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from producers.devstack import free_port, spawn_flower, stop_process, wait_for_port
from tests.chaos.conftest import SECRETS, ChaosStack
from tests.chaos.harness import Progress, queued_messages, submit_batch

pytestmark = pytest.mark.slow

FLOWER_PASSWORD = "flower-PASS-fake-71c2e9"
# What a presigned URL's signature and credential scope look like in any form.
SIGNATURE_MARKS = ("X-Amz-Signature", "X-Amz-Credential", "x-amz-signature", "Signature=", "AWSAccessKeyId")


def everything_in_redis(url: str) -> str:
    """Every value of every key in every database, as text, with kombu's message bodies decoded."""
    client = redis.Redis.from_url(url)
    texts: list[str] = []
    databases = [0] + [int(k[2:]) for k in client.info("keyspace") if k.startswith("db") and k != "db0"]
    for db in databases:
        view = redis.Redis.from_url(url.rsplit("/", 1)[0] + f"/{db}")
        for raw_key in view.scan_iter(count=1000):
            key = raw_key.decode(errors="replace")
            kind = view.type(raw_key).decode()
            values: list[Any]
            if kind == "string":
                values = [view.get(raw_key)]
            elif kind == "hash":
                values = [item for pair in view.hgetall(raw_key).items() for item in pair]
            elif kind == "list":
                values = view.lrange(raw_key, 0, -1)
            elif kind == "set":
                values = list(view.smembers(raw_key))
            elif kind == "zset":
                values = [member for member, _ in view.zrange(raw_key, 0, -1, withscores=True)]
            elif kind == "stream":
                values = [item for _, fields in view.xrange(raw_key) for pair in fields.items() for item in pair]
            else:
                values = []
            texts.append(key)
            texts.extend(decoded(value) for value in values)
    return "\n".join(texts)


def decoded(value: Any) -> str:
    text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    found = [text]
    try:
        document = json.loads(text)
    except ValueError:
        return text
    for body in _bodies(document):  # kombu: {"body": base64, "properties": {"body_encoding": "base64"}}
        try:
            found.append(base64.b64decode(body).decode(errors="replace"))
        except (binascii.Error, ValueError):
            found.append(body)
    return "\n".join(found)


def scan_queued(url: str, job_ids: list[str], where: str, task: str | None = None) -> tuple[int, list[str]]:
    """Decode every queued message; return how many named one of `job_ids` (and ran `task`), and the leaks."""
    messages = queued_messages(url)
    ours = 0
    problems: list[str] = []
    for envelope in messages:
        body = base64.b64decode(envelope["body"]).decode(errors="replace")
        if any(job_id in body for job_id in job_ids) and task in (None, envelope["headers"].get("task")):
            ours += 1
        # The whole envelope: headers (task name, argsrepr, kwargs, any extra header) and properties too.
        problems += leaks(json.dumps(envelope) + "\n" + body, where)
    return ours, problems


def _bodies(document: Any) -> Iterator[str]:
    if isinstance(document, dict):
        if isinstance(document.get("body"), str):
            yield document["body"]
        for value in document.values():
            yield from _bodies(value)
    elif isinstance(document, list):
        for value in document:
            yield from _bodies(value)


def leaks(text: str, where: str) -> list[str]:
    found = [f"{where}: the secret {secret[:8]}… appears" for secret in (*SECRETS, FLOWER_PASSWORD) if secret in text]
    found += [f"{where}: a presigned URL mark {mark!r} appears" for mark in SIGNATURE_MARKS if mark in text]
    return found


@pytest.fixture
def flower(chaos_stack: ChaosStack) -> Iterator[str]:
    port = free_port()
    log = (chaos_stack.logdir / "flower.log").open("ab")
    process = spawn_flower(port, chaos_stack.env, f"ops:{FLOWER_PASSWORD}", log=log)
    try:
        wait_for_port(port, timeout=30, process=process)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(process)


def test_no_secret_in_logs_redis_broker_or_flower(
    chaos_stack: ChaosStack, flower: str, small_media: Any, tmp_path: Any
) -> None:
    from producers.api import LipsyncClient

    stack = chaos_stack
    redis_url = stack.env["LIPSYNC_REDIS_URL"]
    stack.emulator.reset()
    stack.emulator.configure(latency="0.5-1", retention_large=360)
    stack.kill_workers()  # the producer's messages wait in the queue, to be read there
    # Error paths too: a lost submit answer, a model error, a rate limit, broken media.
    stack.emulator.set_faults(drop_submit="once", model_error="once", rate_limit="once:2", runner_5xx="once")
    client = LipsyncClient(stack.settings())
    problems: list[str] = []
    try:
        submitted = submit_batch(client, small_media, 20, "secrets")
        broken = tmp_path / "broken.mp4"
        broken.write_bytes(b"not a video" * 100)
        bad = client.submit(str(broken), small_media["audio_long"][0])
        job_ids = [*submitted.job_ids, bad.id]
        produced, found = scan_queued(redis_url, job_ids, "a producer's queued message")
        assert produced >= len(job_ids), f"only {produced} of {len(job_ids)} producer messages were read in the queue"
        problems += found
        # The workers' own messages: the transfer worker stages and submits (in place) alone; then,
        # with it stopped, the api worker's poller hands finished jobs to a store nobody takes yet.
        stack.start_worker("transfer")
        stack.wait_workers_ready()
        deadline = time.monotonic() + 120
        at_fal: list[str] = []
        while time.monotonic() < deadline and not at_fal:
            at_fal = [job.id for job in client.store.get_many(job_ids) if job.fal is not None]
            time.sleep(0.2)
        assert at_fal, "no job reached fal with the transfer worker alone"
        stack.kill_workers()
        stack.start_worker("api")
        stack.wait_workers_ready()
        deadline = time.monotonic() + 120
        sent_by_workers = 0
        while time.monotonic() < deadline and sent_by_workers == 0:
            sent_by_workers, found = scan_queued(redis_url, job_ids, "a worker's queued message", "lipsync.store")
            time.sleep(0.2)
        assert sent_by_workers > 0, "no worker-sent message was read in the queue"
        problems += found
        stack.start_workers()
        with Progress(client.settings.redis_url, client.settings.key_prefix, job_ids) as progress:
            assert progress.wait_all(120)
        jobs = client.store.get_many([*submitted.job_ids, bad.id])
        assert any(job.error for job in jobs) and any(job.output for job in jobs)
    finally:
        stack.emulator.clear_faults()
        client.close()

    # The detector itself finds a key hidden in a kombu message body (or the scan proves nothing).
    hidden = json.dumps({"body": base64.b64encode(f"[['{SECRETS[0]}'], {{}}]".encode()).decode()})
    assert leaks(decoded(hidden), "self-check")
    anonymous = httpx.get(f"{flower}/api/workers", timeout=30)
    assert anonymous.status_code == 401, "Flower must not answer without its password"
    with httpx.Client(base_url=flower, auth=("ops", FLOWER_PASSWORD), timeout=60) as api:
        deadline = time.monotonic() + 30
        tasks: dict[str, Any] = {}
        # Flower sees a task once its event has come in: every task of the batch, for the scan to mean anything.
        seen: set[str] = set()
        while time.monotonic() < deadline and not set(job_ids) <= seen:
            tasks = api.get("/api/tasks").json()
            seen = {job_id for task in tasks.values() for job_id in job_ids if job_id in json.dumps(task)}
            time.sleep(0.5)
        assert set(job_ids) <= seen, f"Flower saw tasks of {len(seen)} of {len(job_ids)} jobs: the scan proves little"
        pages = {
            "/api/workers?refresh=1": api.get("/api/workers", params={"refresh": 1}).text,
            "/api/tasks": json.dumps(tasks),
            "/api/queues/length": api.get("/api/queues/length").text,
            "/dashboard?json=1": api.get("/dashboard", params={"json": 1}).text,
            "/metrics": api.get("/metrics").text,
        }
        for task_id in list(tasks)[:200]:
            pages[f"/api/task/info/{task_id}"] = api.get(f"/api/task/info/{task_id}").text
        for task_id in list(tasks)[:20]:  # the HTML page an operator opens: args, kwargs, result, traceback
            page = api.get(f"/task/{task_id}")
            assert page.status_code == 200, (task_id, page.status_code)
            pages[f"/task/{task_id}"] = page.text
    for path, text in pages.items():
        problems += leaks(text, f"Flower {path}")
    for log in sorted(stack.logdir.glob("*.log")):
        if log.name == "emulator.log":  # fal's side of the wire: it is given the key and the URLs
            continue
        problems += leaks(log.read_text(errors="replace"), f"log {log.name}")
    in_redis = everything_in_redis(stack.env["LIPSYNC_REDIS_URL"])
    assert "lipsync.submit" in in_redis or "_kombu" in in_redis, "the broker's keys were not scanned"
    problems += leaks(in_redis, "Redis")
    assert not problems, "\n".join(problems)
