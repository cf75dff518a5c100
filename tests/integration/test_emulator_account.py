"""The emulator behaves like a fal account by default, over HTTP: a concurrency limit per key with
fal's FIFO queue (low after normal), X-Fal-Request-Timeout, a locked account, a revoked key, and
fal's request listing that finds a request by its input after a lost submit answer.

Each test uses fresh keys, so each starts with an empty account on a shared emulator process.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from emulator.account import account_id
from emulator.control import EmulatorProcess, start_emulator

APP = "fal-ai/sync-lipsync/v3"
LOCKED = "User is locked. Reason: Exhausted balance. Top up your balance at fal.ai/dashboard/billing."


def data_uri(path: str, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode()


@pytest.fixture(scope="module")
def account_emulator() -> Iterator[EmulatorProcess]:
    """An emulator with its default account model: no --concurrency flag."""
    server = start_emulator("--latency", "0", "--media-mode", "copy")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def pair(media: dict[str, str]) -> dict[str, str]:
    return {
        "video_url": data_uri(media["video_3s"], "video/mp4"),
        "audio_url": data_uri(media["audio_3s"], "audio/wav"),
    }


@pytest.fixture
def new_key() -> Callable[[], str]:
    return lambda: f"account-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def client(account_emulator: EmulatorProcess) -> Iterator[Callable[[str], httpx.Client]]:
    opened: list[httpx.Client] = []

    def open_for(key: str) -> httpx.Client:
        http = httpx.Client(base_url=account_emulator.url, headers={"Authorization": f"Key {key}"}, timeout=30)
        opened.append(http)
        return http

    yield open_for
    for http in opened:
        http.close()


@pytest.fixture
def slow(account_emulator: EmulatorProcess) -> Iterator[None]:
    """Requests that run long enough to be seen running; cancelled at the end of the test."""
    account_emulator.configure(latency="30")
    yield
    account_emulator.configure(latency="0", concurrency=10)


def until(check: Callable[[], bool], timeout: float = 20, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def submit(http: httpx.Client, body: dict[str, Any], **headers: str) -> dict[str, Any]:
    answer = http.post(f"/{APP}", json=body, headers=headers)
    assert answer.status_code == 200, answer.text
    submitted: dict[str, Any] = answer.json()
    return submitted


def status(http: httpx.Client, submitted: dict[str, Any]) -> dict[str, Any]:
    answer = http.get(submitted["status_url"])
    assert answer.status_code in (200, 202), answer.text
    body: dict[str, Any] = answer.json()
    return body


def cancel_all(http: httpx.Client, submitted: list[dict[str, Any]]) -> None:
    for body in submitted:
        http.put(body["cancel_url"])


# concurrency and fal's queue ---------------------------------------------------------------
def test_default_account_runs_ten_at_once_per_key_and_queues_the_rest_first_in_first_out(
    account_emulator: EmulatorProcess, client: Callable[[str], httpx.Client], new_key: Callable[[], str],
    pair: dict[str, str], slow: None,
) -> None:  # fmt: skip
    key_a, key_b = new_key(), new_key()
    fal_a, fal_b = client(key_a), client(key_b)
    batch = [submit(fal_a, pair) for _ in range(13)]
    other = submit(fal_b, pair)
    try:
        until(lambda: account_emulator.account(key_a)["in_progress"] == 10, what="ten running")
        states = [status(fal_a, body) for body in batch]
        assert [s["status"] for s in states[:10]] == ["IN_PROGRESS"] * 10  # the first ten in, the first ten run
        assert [(s["status"], s["queue_position"]) for s in states[10:]] == [
            ("IN_QUEUE", 0),
            ("IN_QUEUE", 1),
            ("IN_QUEUE", 2),
        ]
        # Another key is another account: its request does not wait behind the first account's.
        until(lambda: status(fal_b, other)["status"] == "IN_PROGRESS", what="the other account's request to start")
        # A slot that frees goes to the head of the line.
        assert fal_a.put(batch[0]["cancel_url"]).status_code == 202
        until(lambda: status(fal_a, batch[10])["status"] == "IN_PROGRESS", what="the head of the line to start")
        assert [status(fal_a, body)["queue_position"] for body in batch[11:]] == [0, 1]
        account = account_emulator.account(key_a)
        assert (account["max_in_progress"], account["max_in_queue"], account["in_queue"]) == (10, 3, 2)
        counters = account_emulator.counters()
        assert counters["max_in_progress"] >= 11 and counters["max_in_queue"] >= 3
    finally:
        cancel_all(fal_a, batch)
        cancel_all(fal_b, [other])


def test_low_priority_waits_behind_every_normal_request(
    account_emulator: EmulatorProcess, client: Callable[[str], httpx.Client], new_key: Callable[[], str],
    pair: dict[str, str], slow: None,
) -> None:  # fmt: skip
    account_emulator.configure(concurrency=1)
    fal = client(new_key())
    running = submit(fal, pair)
    low = submit(fal, pair, **{"X-Fal-Queue-Priority": "low"})
    first, second = submit(fal, pair), submit(fal, pair)
    everything = [running, low, first, second]
    try:
        until(lambda: status(fal, running)["status"] == "IN_PROGRESS", what="the first request to run")
        assert [status(fal, body)["queue_position"] for body in (first, second, low)] == [0, 1, 2]
        assert fal.put(running["cancel_url"]).status_code == 202
        until(lambda: status(fal, first)["status"] == "IN_PROGRESS", what="the next normal request to run")
        assert status(fal, low)["status"] == "IN_QUEUE" and status(fal, low)["queue_position"] == 1
    finally:
        cancel_all(fal, everything)


def test_zero_concurrency_means_no_limit(
    account_emulator: EmulatorProcess, client: Callable[[str], httpx.Client], new_key: Callable[[], str],
    pair: dict[str, str], slow: None,
) -> None:  # fmt: skip
    account_emulator.configure(concurrency=0)
    key = new_key()
    fal = client(key)
    batch = [submit(fal, pair) for _ in range(12)]
    try:
        until(lambda: account_emulator.account(key)["in_progress"] == 12, what="all twelve running")
        assert account_emulator.account(key)["max_in_queue"] <= 12
    finally:
        cancel_all(fal, batch)


def test_a_reset_while_requests_run_gives_no_account_extra_slots(
    account_emulator: EmulatorProcess, client: Callable[[str], httpx.Client], new_key: Callable[[], str],
    pair: dict[str, str], slow: None,
) -> None:  # fmt: skip
    account_emulator.configure(concurrency=1)
    key = new_key()
    fal = client(key)
    first = submit(fal, pair)
    until(lambda: status(fal, first)["status"] == "IN_PROGRESS", what="the first request to run")
    account_emulator.reset()
    until(lambda: account_emulator.counters()["in_progress"] == 0, what="the cancelled request to end")
    batch = [submit(fal, pair) for _ in range(2)]
    try:
        until(lambda: status(fal, batch[0])["status"] == "IN_PROGRESS", what="the next request to run")
        assert status(fal, batch[1])["status"] == "IN_QUEUE"
        assert account_emulator.account(key)["in_progress"] == 1
    finally:
        cancel_all(fal, batch)


# X-Fal-Request-Timeout -----------------------------------------------------------------------
def test_request_not_started_within_its_timeout_ends_with_504_user_and_is_not_billed(
    account_emulator: EmulatorProcess, client: Callable[[str], httpx.Client], new_key: Callable[[], str],
    pair: dict[str, str], slow: None,
) -> None:  # fmt: skip
    account_emulator.configure(concurrency=1)
    key = new_key()
    fal = client(key)
    running = submit(fal, pair)
    waiting = submit(fal, pair, **{"X-Fal-Request-Timeout": "1"})
    try:
        until(lambda: status(fal, waiting)["status"] == "COMPLETED", what="the waiting request to time out")
        ended = status(fal, waiting)
        assert ended["error_type"] == "request_timeout"
        result = fal.get(waiting["response_url"])
        assert result.status_code == 504
        assert result.headers["x-fal-request-timeout-type"] == "user"
        assert result.headers["x-fal-error-type"] == "request_timeout"
        assert account_emulator.inspect(waiting["request_id"])["started"] is None
        account = account_emulator.account(key)
        assert (account["started"], account["start_timeouts"]) == (1, 1)  # only the running one is billed
        assert status(fal, running)["status"] == "IN_PROGRESS"  # the running one is not touched
    finally:
        cancel_all(fal, [running, waiting])


def test_a_request_that_started_in_time_runs_past_its_timeout(
    account_emulator: EmulatorProcess, client: Callable[[str], httpx.Client], new_key: Callable[[], str],
    pair: dict[str, str],
) -> None:  # fmt: skip
    account_emulator.configure(latency="2")
    try:
        fal = client(new_key())
        body = submit(fal, pair, **{"X-Fal-Request-Timeout": "1"})
        until(lambda: status(fal, body)["status"] == "COMPLETED", what="the request to complete")
        assert "error" not in status(fal, body)
        assert fal.get(body["response_url"]).status_code == 200
    finally:
        account_emulator.configure(latency="0")


# a locked account, a revoked key ------------------------------------------------------------------
def test_locked_account_refuses_submits_with_fals_403_until_the_lock_ends_and_keeps_answering_status(
    account_emulator: EmulatorProcess, client: Callable[[str], httpx.Client], new_key: Callable[[], str],
    pair: dict[str, str],
) -> None:  # fmt: skip
    key, other_key = new_key(), new_key()
    fal = client(key)
    earlier = submit(fal, pair)
    account_emulator.lock(2, key=key)
    locked_at = time.monotonic()
    refused = fal.post(f"/{APP}", json=pair)
    assert refused.status_code == 403 and refused.json() == {"detail": LOCKED}
    assert status(fal, earlier)["request_id"] == earlier["request_id"]  # status still answers
    assert fal.get("/v1/models/requests/by-endpoint", params={"endpoint_id": APP}).status_code == 200
    assert client(other_key).post(f"/{APP}", json=pair).status_code == 200  # another account is not locked
    until(lambda: fal.post(f"/{APP}", json=pair).status_code == 200, what="the lock to end")
    assert time.monotonic() - locked_at >= 1.5
    assert account_emulator.account(key)["locked_refusals"] >= 2
    assert account_emulator.account(key)["created"] == 2  # nothing was created while locked


def test_a_top_up_unlocks_at_once_and_a_lock_without_key_locks_every_key(
    account_emulator: EmulatorProcess, client: Callable[[str], httpx.Client], new_key: Callable[[], str],
    pair: dict[str, str],
) -> None:  # fmt: skip
    fal, other = client(new_key()), client(new_key())
    account_emulator.lock(3600)
    try:
        assert fal.post(f"/{APP}", json=pair).status_code == 403
        assert other.post(f"/{APP}", json=pair).status_code == 403
        assert account_emulator.counters()["locked"] == ["*"]
    finally:
        account_emulator.unlock()
    assert fal.post(f"/{APP}", json=pair).status_code == 200
    assert account_emulator.counters()["locked"] == []


def test_revoked_key_answers_401_on_every_call(
    account_emulator: EmulatorProcess, client: Callable[[str], httpx.Client], new_key: Callable[[], str],
    pair: dict[str, str],
) -> None:  # fmt: skip
    key = new_key()
    fal = client(key)
    body = submit(fal, pair)
    account_emulator.revoke(key)
    try:
        expected = {"detail": "No user found for Key ID and Secret"}
        for answer in (
            fal.post(f"/{APP}", json=pair),
            fal.get(body["status_url"]),
            fal.get(body["response_url"]),
            fal.get("/v1/models/requests/by-endpoint", params={"endpoint_id": APP}),
        ):
            assert answer.status_code == 401 and answer.json() == expected
        assert client(new_key()).post(f"/{APP}", json=pair).status_code == 200
    finally:
        account_emulator.restore(key)
    assert fal.post(f"/{APP}", json=pair).status_code == 200


# the request listing ---------------------------------------------------------------------------
def test_listing_finds_the_request_of_a_lost_submit_answer_by_its_input(
    account_emulator: EmulatorProcess, client: Callable[[str], httpx.Client], new_key: Callable[[], str],
    pair: dict[str, str],
) -> None:  # fmt: skip
    key = new_key()
    fal = client(key)
    others = [submit(fal, {**pair, "sync_mode": mode}) for mode in ("loop", "bounce")]
    lost_input = {**pair, "sync_mode": "remap"}
    account_emulator.set_faults(drop_submit="once")
    with pytest.raises(httpx.HTTPError):
        fal.post(f"/{APP}", json=lost_input)
    page = account_emulator.list_requests(key, APP, expand="payloads")
    found = [entry for entry in page["items"] if entry["json_input"] == lost_input]
    assert len(found) == 1 and found[0]["endpoint_id"] == APP
    lost_id = found[0]["request_id"]
    assert lost_id not in {body["request_id"] for body in others}
    assert set(found[0]) >= {
        "request_id",
        "endpoint_id",
        "sent_at",
        "started_at",
        "ended_at",
        "status_code",
        "duration",
    }
    assert account_emulator.account(key)["created"] == 3  # one request per input: the lost one exists once
    # The found request is the real one: it completes and its result is served.
    until(lambda: fal.get(f"/fal-ai/sync-lipsync/requests/{lost_id}/status").status_code == 200, what="completion")
    assert fal.get(f"/fal-ai/sync-lipsync/requests/{lost_id}").status_code == 200
    ended = account_emulator.list_requests(key, APP, request_id=lost_id, status="success")["items"]
    assert len(ended) == 1 and ended[0]["status_code"] == 200 and ended[0]["ended_at"] is not None
    assert "json_input" not in ended[0]  # payloads only when asked


def test_listing_pages_with_fals_cursor_and_shows_only_the_callers_requests(
    account_emulator: EmulatorProcess, client: Callable[[str], httpx.Client], new_key: Callable[[], str],
    pair: dict[str, str],
) -> None:  # fmt: skip
    key = new_key()
    fal = client(key)
    mine = {submit(fal, pair)["request_id"] for _ in range(3)}
    submit(client(new_key()), pair)  # another account's request
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(5):  # three requests, two a page: a cursor that does not move on fails here, not hangs
        page = account_emulator.list_requests(key, APP, limit=2, **({"cursor": cursor} if cursor else {}))
        seen += [entry["request_id"] for entry in page["items"]]
        assert page["has_more"] == (page["next_cursor"] is not None)
        if not page["has_more"]:
            break
        cursor = page["next_cursor"]
    assert sorted(seen) == sorted(mine)
    assert account_emulator.list_requests(key, "fal-ai/other-app")["items"] == []
    refused = fal.get("/v1/models/requests/by-endpoint", params={"limit": "5"})
    assert refused.status_code == 422 and "endpoint_id" in refused.text
    assert fal.get("/v1/models/requests/by-endpoint", params={"endpoint_id": APP, "limit": "101"}).status_code == 422


def test_command_line_flags_start_a_locked_account_a_revoked_key_and_a_finished_only_listing(
    pair: dict[str, str],
) -> None:
    server = start_emulator(
        "--latency", "30", "--locked", "3600", "--revoked-keys", "revoked-key", "--listing-finished-only"
    )  # fmt: skip
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            refused = http.post(f"/{APP}", json=pair, headers={"Authorization": "Key some-key"})
            assert refused.status_code == 403 and refused.json() == {"detail": LOCKED}
            revoked = http.get("/v1/models/requests/by-endpoint", params={"endpoint_id": APP},
                               headers={"Authorization": "Key revoked-key"})  # fmt: skip
            assert revoked.status_code == 401
            server.unlock()
            running = http.post(f"/{APP}", json=pair, headers={"Authorization": "Key some-key"})
            assert running.status_code == 200
            assert server.list_requests("some-key", APP)["items"] == []  # not ended: not listed
            assert server.counters()["accounts"][account_id("some-key")]["created"] == 1
    finally:
        server.stop()
