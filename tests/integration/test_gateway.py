"""The HTTP gateway as a platform meets it: a real `lipsync serve` process and real workers on
their own Redis database, the fal emulator delivering signed webhooks, a platform-side
receiver verifying callbacks with the snippet from docs/gateway.md, and schemathesis fuzzing
the OpenAPI spec.

Polling is set to wait 20 s before its first look, so a job done in seconds was done by webhook.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lipsync.jobstore import JobStore
from lipsync.tenants import TenantStore
from producers.devstack import DEFAULT_WORKERS, free_port, spawn_worker, stop_process, wait_for_port
from tests.unit.test_signatures import documented_verifier

POLL_FIRST_S = 20.0
PLATFORM_BUCKET = "platform-media"
PREFIX = "gw"


# the platform side: a callback receiver and a stand-in for fal's key server -------------------------
@dataclass
class Received:
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """The platform's callback endpoint: records every POST, fails the first `fail_first` ones."""

    url: str = ""
    deliveries: list[Received] = field(default_factory=list)
    fail_first: int = 0
    server: ThreadingHTTPServer | None = None

    def for_job(self, job_id: str) -> list[Received]:
        return [d for d in self.deliveries if json.loads(d.body).get("id") == job_id]


def start_receiver() -> Receiver:
    receiver = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            receiver.deliveries.append(Received({k.lower(): v for k, v in self.headers.items()}, body))
            failing = receiver.fail_first > 0
            receiver.fail_first -= 1
            self.send_response(500 if failing else 200)
            self.send_header("content-length", "0")
            self.end_headers()

        def do_GET(self) -> None:  # noqa: N802
            self.send_response(404)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    receiver.server = server
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/lipsync"
    return receiver


class FalKeys:
    """Serves a JWKS with the emulator's key and one this test signs with, as fal would."""

    def __init__(self, emulator_url: str) -> None:
        self.key = Ed25519PrivateKey.generate()
        raw = self.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        ours = {"kty": "OKP", "crv": "Ed25519", "x": base64.urlsafe_b64encode(raw).rstrip(b"=").decode()}
        theirs = httpx.get(f"{emulator_url}/.well-known/jwks.json", timeout=10).json()["keys"]
        document = json.dumps({"keys": [*theirs, ours]}).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(document)))
                self.end_headers()
                self.wfile.write(document)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/.well-known/jwks.json"

    def sign(
        self, request_id: str, body: bytes, *, timestamp: int | None = None, key: Ed25519PrivateKey | None = None
    ) -> dict[str, str]:
        stamp = str(timestamp if timestamp is not None else int(time.time()))
        message = f"{request_id}\nfal-user\n{stamp}\n{hashlib.sha256(body).hexdigest()}".encode()
        return {
            "content-type": "application/json",
            "x-fal-webhook-request-id": request_id,
            "x-fal-webhook-user-id": "fal-user",
            "x-fal-webhook-timestamp": stamp,
            "x-fal-webhook-signature": (key or self.key).sign(message).hex(),
        }


# the gateway stack -------------------------------------------------------------------------------
@dataclass
class Tenant:
    name: str
    api_key: str
    secret: str
    http: httpx.Client


@dataclass
class GatewayStack:
    url: str
    env: dict[str, str]
    store: JobStore
    tenants: TenantStore
    receiver: Receiver
    fal_keys: FalKeys
    acme: Tenant
    globex: Tenant
    sources: dict[str, str]
    processes: list[subprocess.Popen[bytes]]

    def wait_for(
        self, job_id: str, timeout: float = 60.0, statuses: tuple[str, ...] = ("completed", "failed", "cancelled")
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job: dict[str, Any] = self.acme.http.get(f"/v1/jobs/{job_id}").json()
            if job.get("status") in statuses or time.monotonic() > deadline:
                return job
            time.sleep(0.1)

    def events(self, job_id: str) -> list[str]:
        return [event["event"] for event in self.store.events(job_id)]


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "producers.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def add_tenant(env: dict[str, str], url: str, name: str) -> Tenant:
    """Through the CLI, as an operator would."""
    result = cli(env, "tenants", "add", name)
    assert result.returncode == 0, result.stderr
    issued = json.loads(result.stdout)
    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {issued['api_key']}"}, timeout=30)
    return Tenant(name, issued["api_key"], issued["callback_secret"], http)


def start_gateway(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", "producers.cli", "serve", "--port", str(port), "--log-level", "warning"],
        env={**os.environ, **env},
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    wait_for_port(port, timeout=30, process=process)
    return process


def redis_db(url: str, db: int) -> str:
    return url.rsplit("/", 1)[0] + f"/{db}"


@pytest.fixture(scope="module")
def gateway(
    stack_env: dict[str, str], redis_server: Any, emulator: Any, media: dict[str, str], tmp_path_factory: Any
) -> Iterator[GatewayStack]:
    logdir = tmp_path_factory.mktemp("gateway-logs")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    fal_keys = FalKeys(emulator.url)
    database = redis_db(redis_server.url, 5)  # its own broker and job store: the session's workers stay out
    env = {
        **stack_env,
        "LIPSYNC_REDIS_URL": database,
        "LIPSYNC_BROKER_URL": database,
        "LIPSYNC_KEY_PREFIX": PREFIX,
        "LIPSYNC_FAL_WEBHOOK_URL": f"{url}/v1/fal/webhook",
        "LIPSYNC_FAL_JWKS_URL": fal_keys.url,
        "LIPSYNC_POLL_INITIAL_S": str(POLL_FIRST_S),
        "LIPSYNC_POLL_MAX_S": "30",
        "LIPSYNC_CALLBACK_RETRY_BASE_S": "0.5",
        "LIPSYNC_CALLBACK_RETRY_MAX_S": "2",
        "LIPSYNC_GATEWAY_RATE_LIMIT_PER_S": "40",
        "LIPSYNC_GATEWAY_MAX_BODY_BYTES": "65536",
        "LIPSYNC_METRICS_PORT": "0",
        "LIPSYNC_GATEWAY_S3_BUCKETS": f"{PLATFORM_BUCKET},lipsync-test",  # ours stays closed even if listed
    }
    from config.settings import Settings
    from lipsync.storage import Storage

    platform = Storage(Settings(s3_bucket=PLATFORM_BUCKET))
    platform.ensure_bucket()
    sources = {}
    for name in ("video_3s", "audio_3s", "audio_5s"):
        platform.upload_file(media[name], f"{name}.bin", content_type="application/octet-stream")
        sources[name] = f"s3://{PLATFORM_BUCKET}/{name}.bin"
    processes = [start_gateway(env, port, logdir / "gateway.log")]
    for spec in DEFAULT_WORKERS:
        processes.append(spawn_worker(spec, env, log=(logdir / f"worker-{spec.name}.log").open("ab")))
    client = redis.Redis.from_url(database)
    receiver = start_receiver()
    stack = GatewayStack(
        url=url,
        env=env,
        store=JobStore(client, PREFIX),
        tenants=TenantStore(client, PREFIX),
        receiver=receiver,
        fal_keys=fal_keys,
        acme=add_tenant(env, url, "acme"),
        globex=add_tenant(env, url, "globex"),
        sources=sources,
        processes=processes,
    )
    try:
        yield stack
    finally:
        for process in reversed(processes):
            stop_process(process, timeout=20)
        for tenant in (stack.acme, stack.globex):
            tenant.http.close()
        receiver.server.shutdown()  # type: ignore[union-attr]
        fal_keys.server.shutdown()
        client.close()


def submit(gateway: GatewayStack, tenant: Tenant | None = None, **fields: Any) -> dict[str, Any]:
    body = {"video_url": gateway.sources["video_3s"], "audio_url": gateway.sources["audio_3s"], **fields}
    response = (tenant or gateway.acme).http.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    return job


# the service ---------------------------------------------------------------------------------------
def test_spec_health_and_readiness_are_served(gateway: GatewayStack) -> None:
    spec = httpx.get(f"{gateway.url}/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/batches", "/v1/fal/webhook/{job_id}"} <= set(spec["paths"])
    assert httpx.get(f"{gateway.url}/healthz").json() == {"status": "ok", "checks": {}}
    ready = httpx.get(f"{gateway.url}/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"redis": "ok", "s3": "ok"}


# webhooks in ---------------------------------------------------------------------------------------
def test_job_finishes_by_fal_webhook_long_before_the_first_poll(gateway: GatewayStack, emulator: Any) -> None:
    started = time.monotonic()
    before = emulator.counters()
    job = submit(gateway, sync_mode="loop", audio_url=gateway.sources["audio_5s"], metadata={"clip": "c-1"})
    done = gateway.wait_for(job["id"], timeout=POLL_FIRST_S)
    elapsed = time.monotonic() - started
    assert done["status"] == "completed", done
    events = gateway.events(job["id"])
    assert "fal completed (by webhook); storing the output" in events, events
    assert "poll" not in done["attempts"] and done["attempts"]["webhook"] == 1
    assert abs(done["output"]["duration"] - 5.0) < 0.05 and done["output"]["presigned_url"].startswith("http")
    assert done["metadata"] == {"clip": "c-1"}
    assert emulator.created_since(before) == 1
    fal_finished = emulator.inspect(done["fal_request_id"])["finished"]
    moved_on = done["timestamps"]["storing"] - fal_finished
    # Before the first poll was due: the webhook moved it, however slow this machine is today.
    assert done["timestamps"]["storing"] < done["timestamps"]["submitted"] + POLL_FIRST_S, done["timestamps"]
    print(
        f"\nwebhook: completed in {elapsed:.2f}s, moved on {moved_on * 1000:.0f} ms after fal finished; "
        f"the first poll was due at {POLL_FIRST_S:.0f}s"
    )
    # The poll, when it comes, finds the job moved on and changes nothing.
    assert gateway.store.get(job["id"]).attempts.get("poll") is None
    # The gateway made the transition, so its own /metrics counts it (a worker's cannot).
    metrics = httpx.get(f"{gateway.url}/metrics").text
    assert 'lipsync_job_transitions_total{status="storing"}' in metrics
    assert "lipsync_fal_inference_seconds_count" in metrics


def test_without_webhooks_polling_still_completes_the_job(
    workers: Any, client: Any, emulator: Any, media: dict[str, str]
) -> None:
    """The session's workers submit with no webhook URL: the poll is the safety net, and says so."""
    job = client.submit(media["video_3s"], media["audio_3s"])
    (done,) = client.wait([job.id], timeout_s=60)
    assert done.status.value == "completed"
    events = [e["event"] for e in client.store.events(job.id)]
    assert "fal completed (by poll); storing the output" in events
    moved_on = done.timestamps["storing"] - emulator.inspect(done.fal.request_id)["finished"]
    print(f"\npoll (first after 0.3 s, backoff to 2 s): moved on {moved_on * 1000:.0f} ms after fal finished")


def _fal_body(request_id: str, status: str = "OK") -> bytes:
    payload = {"video": {"url": "http://127.0.0.1:9/never.mp4", "content_type": "video/mp4"}}
    return json.dumps(
        {
            "request_id": request_id,
            "gateway_request_id": request_id,
            "status": status,
            "payload": payload,
            "error": None,
        }
    ).encode()


def test_forged_replayed_stale_and_malformed_webhooks_are_refused_and_a_duplicate_changes_nothing(
    gateway: GatewayStack,
) -> None:
    job = gateway.wait_for(submit(gateway)["id"])
    other = gateway.wait_for(submit(gateway, audio_url=gateway.sources["audio_5s"])["id"])
    assert job["status"] == other["status"] == "completed"
    request_id = job["fal_request_id"]
    hook = f"{gateway.url}/v1/fal/webhook/{job['id']}"
    record_before = gateway.store.redis.hgetall(gateway.store.job_key(job["id"]))
    events_before = gateway.store.events(job["id"])
    rejected_key = f"{PREFIX}:fal-webhooks:rejected"
    recorded_before = gateway.store.redis.xlen(rejected_key)

    body = _fal_body(request_id)
    genuine = gateway.fal_keys.sign(request_id, body)
    duplicate = httpx.post(hook, content=body, headers=genuine)
    assert duplicate.status_code == 200 and duplicate.json()["outcome"] == "duplicate"

    forger = Ed25519PrivateKey.generate()
    now = int(time.time())
    refused = {
        "replayed": (body, genuine, hook),
        "bad_signature": (body, gateway.fal_keys.sign(request_id, body, key=forger), hook),
        "tampered": (body.replace(b"never", b"other"), genuine, hook),
        "stale": (body, gateway.fal_keys.sign(request_id, body, timestamp=now - 400), hook),
        "future": (body, gateway.fal_keys.sign(request_id, body, timestamp=now + 400), hook),
        "unsigned": (body, {"content-type": "application/json"}, hook),
        "not_hex": (body, {**gateway.fal_keys.sign(request_id, body), "x-fal-webhook-signature": "zz" * 64}, hook),
        "not_json": (b"{oops", gateway.fal_keys.sign(request_id, b"{oops"), hook),
        "other_request": (_fal_body("req-x"), gateway.fal_keys.sign("req-x", _fal_body("req-x")), hook),
        "other_job": (
            body,
            # Not a replay: signed anew, one second before the genuine signature whatever the
            # clock did since (`now - 1` equals the genuine timestamp when a second ticks between).
            gateway.fal_keys.sign(request_id, body, timestamp=int(genuine["x-fal-webhook-timestamp"]) - 1),
            f"{gateway.url}/v1/fal/webhook/{other['id']}",
        ),
    }
    reasons = {}
    for name, (content, headers, url) in refused.items():
        response = httpx.post(url, content=content, headers=headers)
        assert response.status_code == 401, (name, response.text)
        reasons[name] = response.json()["code"]
    assert reasons == {
        "replayed": "replayed",
        "bad_signature": "bad_signature",
        "tampered": "bad_signature",
        "stale": "stale",
        "future": "stale",
        "unsigned": "malformed",
        "not_hex": "malformed",
        "not_json": "malformed",
        "other_request": "unknown_request",
        "other_job": "unknown_request",
    }
    assert gateway.store.redis.xlen(rejected_key) == recorded_before + len(refused)
    assert gateway.store.redis.hgetall(gateway.store.job_key(job["id"])) == record_before
    assert gateway.store.events(job["id"]) == events_before
    assert gateway.store.get(other["id"]).status.value == "completed"


def test_webhook_arriving_while_the_submit_is_still_being_recorded_adopts_the_request_once(
    gateway: GatewayStack, emulator: Any
) -> None:
    """fal may answer by webhook before our submit has its answer (issue 12): fal's verified delivery to
    this job's own URL names the job's request, which is adopted; the submit's late answer agrees with
    it, and the job completes once, on that one request, which is never cancelled."""
    emulator.configure(hang_seconds=3)
    before = emulator.counters()
    hangs_before = before["faults_injected"].get("hang_answer", 0)
    emulator.set_faults(hang_answer="once")  # fal makes the request and runs it; its answer waits 3 s
    try:
        job = submit(gateway)
        done = gateway.wait_for(job["id"], timeout=POLL_FIRST_S * 2)
    finally:
        emulator.clear_faults()
        emulator.configure(hang_seconds=60)
    assert emulator.counters()["faults_injected"].get("hang_answer", 0) > hangs_before, "the fault never fired"
    assert done["status"] == "completed", done
    events = gateway.events(job["id"])
    adopted = f"adopted fal request {done['fal_request_id']} from its verified webhook"
    assert any(e.startswith(adopted) for e in events), events
    assert not any(e.startswith("submitted to fal as") for e in events), "the answer came first: nothing was adopted"
    assert emulator.created_since(before) == 1
    assert not emulator.inspect(done["fal_request_id"])["cancel_requested"], "the job's own request was cancelled"


def test_fal_error_reported_by_webhook_fails_the_job_in_fals_words(gateway: GatewayStack, emulator: Any) -> None:
    emulator.set_faults(model_error="once")
    try:
        job = submit(gateway)
        done = gateway.wait_for(job["id"], timeout=POLL_FIRST_S)
    finally:
        emulator.clear_faults()
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "fal_error" and done["error"]["stage"] == "webhook"
    assert "poll" not in done["attempts"]
    assert any(e.startswith("failed (by webhook): fal_error") for e in gateway.events(job["id"]))


def test_poll_and_webhook_racing_move_the_job_on_exactly_once(gateway: GatewayStack) -> None:
    from lipsync.jobs import finish_with_result
    from lipsync.models import FalRequest, Job, JobStatus, LipsyncInput
    from lipsync.observe import observed_store

    # Its own prefix: no dispatcher looks at this job, only the racers below.
    store = observed_store(redis.Redis.from_url(gateway.env["LIPSYNC_REDIS_URL"]), "race")
    now = time.time()
    fal = FalRequest(request_id="req-race", status_url="http://x/s", response_url="http://x/r", cancel_url="http://x/c")
    job = Job(
        id=store.new_id(), status=JobStatus.queued, request=LipsyncInput(video_url="s3://b/v", audio_url="s3://b/a"),
        request_digest="d", created_at=now, updated_at=now, deadline_at=now + 600,
    )  # fmt: skip
    store.create(job, dispatch_lease_s=3600)
    store.advance(job.id, JobStatus.in_progress, from_=[JobStatus.queued], fields={"fal": fal.model_dump(mode="json")})
    body = {"video": {"url": "http://127.0.0.1:9/out.mp4"}}
    barrier = threading.Barrier(8)
    wins: list[str] = []

    def race(via: str) -> None:
        barrier.wait()
        if finish_with_result(store, job.id, fal, body, via=via, transfer_lease_s=300):
            wins.append(via)

    racers = [threading.Thread(target=race, args=("poll" if n % 2 else "webhook",)) for n in range(8)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join()
    assert len(wins) == 1, wins
    assert store.get(job.id).status is JobStatus.storing
    completions = [e["event"] for e in store.events(job.id) if e["event"].startswith("fal completed")]
    assert completions == [f"fal completed (by {wins[0]}); storing the output"]


# callbacks out -------------------------------------------------------------------------------------
def test_callback_is_signed_retried_and_verified_by_the_platform_with_the_documented_snippet(
    gateway: GatewayStack,
) -> None:
    verify = documented_verifier()
    gateway.receiver.fail_first = 1
    job = submit(gateway, callback_url=gateway.receiver.url, metadata={"clip": "c-2"})
    gateway.wait_for(job["id"])
    deadline = time.monotonic() + 20
    while len(gateway.receiver.for_job(job["id"])) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    deliveries = gateway.receiver.for_job(job["id"])
    assert len(deliveries) == 2, gateway.events(job["id"])
    for delivery in deliveries:
        assert verify(gateway.acme.secret, delivery.body, delivery.headers["x-lipsync-signature"])
        assert not verify(gateway.globex.secret, delivery.body, delivery.headers["x-lipsync-signature"])
    assert deliveries[0].headers["x-lipsync-delivery"] == deliveries[1].headers["x-lipsync-delivery"]
    record = json.loads(deliveries[-1].body)
    assert record["status"] == "completed" and record["metadata"] == {"clip": "c-2"}
    assert record["output"]["presigned_url"].startswith("http")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any("delivered" in e for e in gateway.events(job["id"])):
        time.sleep(0.1)
    events = gateway.events(job["id"])
    assert any(e.startswith("callback 1 failed: HTTP 500; next in") for e in events), events
    assert "callback 2 delivered: HTTP 200" in events, events
    assert gateway.store.redis.zscore(gateway.store.callbacks_key, job["id"]) is None


def test_cancelled_job_is_called_back_too(gateway: GatewayStack, emulator: Any) -> None:
    # fal takes a minute: the job cannot end before the cancel, so the test never skips.
    emulator.configure(latency="60")
    try:
        job = submit(gateway, callback_url=gateway.receiver.url)
        response = gateway.acme.http.post(f"/v1/jobs/{job['id']}/cancel")
    finally:
        emulator.configure(latency="0.3")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    deadline = time.monotonic() + 15
    while not gateway.receiver.for_job(job["id"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    (delivery,) = gateway.receiver.for_job(job["id"])
    assert json.loads(delivery.body)["status"] == "cancelled"


# tenants -------------------------------------------------------------------------------------------
def test_tenant_cannot_read_cancel_retry_or_list_another_tenants_jobs(gateway: GatewayStack) -> None:
    missing = f"s3://{PLATFORM_BUCKET}/missing.bin"
    mine = submit(gateway, video_url=missing, idempotency_key="shared-key")
    batch = gateway.acme.http.post("/v1/batches", json={"jobs": [{"video_url": missing, "audio_url": missing}]})
    assert batch.status_code == 202
    batch_id = batch.json()["id"]
    failed = gateway.wait_for(mine["id"])
    assert failed["status"] == "failed"
    intruder = gateway.globex.http
    for method, path in [
        ("GET", f"/v1/jobs/{mine['id']}"),
        ("GET", f"/v1/jobs/{mine['id']}/events"),
        ("POST", f"/v1/jobs/{mine['id']}/cancel"),
        ("POST", f"/v1/jobs/{mine['id']}/retry"),
        ("GET", f"/v1/batches/{batch_id}"),
        ("GET", f"/v1/jobs?batch={batch_id}"),
    ]:
        response = intruder.request(method, path)
        assert response.status_code == 404, (method, path, response.text)
    listed = intruder.get("/v1/jobs", params={"limit": 200}).json()["jobs"]
    assert mine["id"] not in {j["id"] for j in listed}
    listed_failed = intruder.get("/v1/jobs", params={"status": "failed", "limit": 200}).json()["jobs"]
    assert mine["id"] not in {j["id"] for j in listed_failed}
    # The same idempotency key is another job for another tenant, not a way into the first.
    theirs = submit(gateway, gateway.globex, video_url=missing, idempotency_key="shared-key")
    assert theirs["id"] != mine["id"] and theirs["idempotency_key"] == "shared-key"
    # Nothing the intruder did changed the job; its owner can still retry it.
    assert gateway.store.get(mine["id"]).attempts.get("retries") is None
    # Accepted and counted once (its status right after may already be staging or failed again:
    # a worker is free to pick it up at once, so the status itself is not the proof).
    retried = gateway.acme.http.post(f"/v1/jobs/{mine['id']}/retry")
    assert retried.status_code == 200, retried.text
    assert gateway.store.get(mine["id"]).attempts.get("retries") == 1


def test_batch_counts_and_cursor_pages_cover_every_job_once(gateway: GatewayStack) -> None:
    missing = f"s3://{PLATFORM_BUCKET}/missing.bin"
    jobs = [{"video_url": missing, "audio_url": missing, "metadata": {"n": str(n)}} for n in range(7)]
    created = gateway.acme.http.post("/v1/batches", json={"jobs": jobs})
    assert created.status_code == 202, created.text
    batch = created.json()
    assert batch["total"] == 7 and sum(batch["counts"].values()) == 7
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"batch": batch["id"], "limit": 3, **({"cursor": cursor} if cursor else {})}
        page = gateway.acme.http.get("/v1/jobs", params=params).json()
        seen += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(batch["job_ids"]) and len(seen) == 7
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        counts = gateway.acme.http.get(f"/v1/batches/{batch['id']}").json()["counts"]
        if counts == {"failed": 7}:
            break
        time.sleep(0.2)
    assert counts == {"failed": 7}
    failed = gateway.acme.http.get("/v1/jobs", params={"status": "failed", "batch": batch["id"]}).json()["jobs"]
    assert len(failed) == 7 and all(j["error"]["code"] for j in failed)


def test_cursor_pages_survive_equal_times_and_sparse_status_filters(
    redis_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lipsync.models import JobStatus
    from producers.gateway import pages

    client = redis.Redis.from_url(redis_db(redis_server.url, 7))
    client.flushdb()
    store = JobStore(client, "pages")
    index = "pages:index"
    ids = [f"{n:032x}" for n in range(1000)]
    # Many jobs share a creation time; one in 37 is failed.
    client.zadd(index, {job_id: float(n // 7) for n, job_id in enumerate(ids)})
    for n, job_id in enumerate(ids):
        client.hset(store.job_key(job_id), "status", "failed" if n % 37 == 0 else "queued")
    monkeypatch.setattr(pages, "MAX_SCANS", 2)  # force short pages: the budget runs out

    def read_all(status: JobStatus | None, limit: int) -> list[str]:
        seen: list[str] = []
        cursor = None
        for _ in range(2000):
            page, next_cursor = pages.page_of_ids(store, index, pages.decode_cursor(cursor), limit, status)
            seen += page
            if next_cursor is None:
                return seen
            cursor = next_cursor
        raise AssertionError("pages never ended")

    newest_first = sorted(ids, key=lambda i: (int(i, 16) // 7, i), reverse=True)
    assert read_all(None, 9) == newest_first
    failed = [i for i in newest_first if int(i, 16) % 37 == 0]
    assert read_all(JobStatus.failed, 4) == failed
    client.close()


# refusals ------------------------------------------------------------------------------------------
def test_unsafe_sources_and_callbacks_large_bodies_and_bad_keys_are_refused(gateway: GatewayStack) -> None:
    http = gateway.acme.http
    cases = {
        "callback_url": {"callback_url": "http://10.1.2.3/hook"},
        "video_url": {"video_url": "s3://lipsync-test/outputs/someone-else.mp4"},
        "audio_url": {"audio_url": "/etc/passwd"},
    }
    unlisted = {"video_url": "s3://not-listed-bucket/v.mp4", "audio_url": gateway.sources["audio_3s"]}
    refused = http.post("/v1/jobs", json=unlisted)
    assert refused.status_code == 422 and "not one tenants may read from" in refused.text
    for field_name, override in cases.items():
        body = {"video_url": gateway.sources["video_3s"], "audio_url": gateway.sources["audio_3s"], **override}
        response = http.post("/v1/jobs", json=body)
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"] == ["body", field_name]
    huge = b'{"video_url": "' + b"x" * 70_000 + b'"}'
    too_large = http.post("/v1/jobs", content=huge, headers={"content-type": "application/json"})
    assert too_large.status_code == 413 and too_large.json()["code"] == "too_large"
    assert httpx.get(f"{gateway.url}/v1/jobs").status_code == 401
    assert httpx.get(f"{gateway.url}/v1/jobs", headers={"Authorization": "Bearer lsk_nope"}).status_code == 401


def test_revoked_key_stops_working_and_a_rotated_one_starts(gateway: GatewayStack) -> None:
    tenant = add_tenant(gateway.env, gateway.url, "initech")
    assert tenant.http.get("/v1/jobs").status_code == 200
    assert cli(gateway.env, "tenants", "revoke", "initech").returncode == 0
    assert tenant.http.get("/v1/jobs").status_code == 401
    rotated = json.loads(cli(gateway.env, "tenants", "rotate", "initech").stdout)
    fresh = httpx.get(f"{gateway.url}/v1/jobs", headers={"Authorization": f"Bearer {rotated['api_key']}"})
    assert fresh.status_code == 200 and tenant.http.get("/v1/jobs").status_code == 401
    listing = cli(gateway.env, "tenants", "list", "--json").stdout
    assert rotated["api_key"] not in listing and "initech" in listing
    stored = json.dumps(
        {k.decode(): v.decode() for k, v in gateway.store.redis.hgetall(f"{PREFIX}:tenant:initech").items()}
    )
    assert rotated["api_key"] not in stored  # only its hash is kept
    tenant.http.close()


def test_rate_limit_per_key_answers_429_with_retry_after(gateway: GatewayStack) -> None:
    from concurrent.futures import ThreadPoolExecutor

    sent = 240
    started = time.time()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: gateway.globex.http.get("/v1/jobs", params={"limit": 1}), range(sent)))
    # 40 a second: however slow the machine, no more than 40 per one-second window the burst touched.
    windows = int(time.time()) - int(started) + 1
    statuses = [a.status_code for a in answers]
    assert set(statuses) <= {200, 429} and statuses.count(200) <= 40 * windows, (windows, statuses.count(200))
    if 40 * windows < sent:
        assert 429 in statuses
    assert all(int(a.headers["retry-after"]) >= 1 for a in answers if a.status_code == 429)
    assert httpx.get(f"{gateway.url}/healthz").status_code == 200  # needs no key, counts against none
    assert gateway.acme.http.get("/v1/jobs", params={"limit": 1}).status_code == 200  # another key, its own budget


# the spec, fuzzed ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_openapi_spec_fuzzed_by_schemathesis_gives_no_5xx_and_no_schema_violations(
    stack_env: dict[str, str], redis_server: Any, tmp_path: Path
) -> None:
    # A gateway of its own with no workers (fuzzed jobs just wait) and no rate limit.
    database = redis_db(redis_server.url, 6)
    env = {
        **stack_env,
        "LIPSYNC_REDIS_URL": database,
        "LIPSYNC_BROKER_URL": database,
        "LIPSYNC_KEY_PREFIX": "fuzz",
        "LIPSYNC_GATEWAY_RATE_LIMIT_PER_S": "0",
        "LIPSYNC_METRICS_PORT": "0",
        "LIPSYNC_FAL_JWKS_URL": "http://127.0.0.1:9/jwks.json",  # nothing there: webhooks are refused
    }
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_gateway(env, port, tmp_path / "gateway.log")
    try:
        tenant = add_tenant(env, url, "fuzzer")
        tenant.http.close()
        started = time.monotonic()
        result = subprocess.run(
            [
                str(Path(sys.executable).parent / "schemathesis"),
                "run",
                f"{url}/openapi.json",
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,"
                "response_schema_conformance,response_headers_conformance,negative_data_rejection",
                "--header",
                f"Authorization: Bearer {tenant.api_key}",
                "--max-examples",
                "100",
                "--seed",
                "7",
                "--workers",
                "2",
                "--no-shrink",
                "--phases",
                "examples,coverage,fuzzing",
                "--report",
                "ndjson",
                "--report-ndjson-path",
                str(tmp_path / "fuzz.ndjson"),
                "--request-timeout",
                "20",
            ],  # fmt: skip
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=240,
            cwd=tmp_path,  # its cache (.schemathesis/) stays out of the working tree
        )
        elapsed = time.monotonic() - started
    finally:
        stop_process(process)
    summary = result.stdout[-3000:]
    print(f"\nschemathesis ({elapsed:.0f}s):\n{summary}")
    assert result.returncode == 0, summary + result.stderr[-2000:] + (tmp_path / "gateway.log").read_text()[-3000:]
