"""The fal client's one money decision: which failures may be retried, and which never re-POST."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from pydantic import SecretStr

from lipsync.errors import FalError, InvalidInput, RetryableError
from lipsync.fal import AccountRefused, FalQueueClient, QueueState, SubmitOutcomeUnknown
from lipsync.models import FalRequest

BASE = "https://queue.example.test"
REQUEST = FalRequest(
    request_id="r1",
    status_url=f"{BASE}/fal-ai/sync-lipsync/requests/r1/status",
    response_url=f"{BASE}/fal-ai/sync-lipsync/requests/r1",
    cancel_url=f"{BASE}/fal-ai/sync-lipsync/requests/r1/cancel",
)


def client(handler: Callable[[httpx.Request], httpx.Response]) -> FalQueueClient:
    return FalQueueClient(
        queue_url=BASE, app="fal-ai/sync-lipsync/v3", key=SecretStr("k-123456"),
        transport=httpx.MockTransport(handler),
    )  # fmt: skip


def test_submit_sends_key_marker_and_webhook_and_reads_the_urls() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={
            "request_id": "r1", "status_url": REQUEST.status_url, "response_url": REQUEST.response_url,
            "cancel_url": REQUEST.cancel_url, "queue_position": 3,
        })  # fmt: skip

    made = client(handler).submit(
        {"video_url": "v", "audio_url": "a"}, marker="job-1", webhook_url="https://hook.test/x"
    )
    assert made.request_id == "r1" and made.queue_position == 3
    assert seen[0].headers["authorization"] == "Key k-123456"
    assert seen[0].headers["x-lipsync-job-id"] == "job-1"
    assert seen[0].url.params["fal_webhook"] == "https://hook.test/x"
    assert seen[0].url.path == "/fal-ai/sync-lipsync/v3"


def test_rate_limit_is_retryable_after_the_time_fal_asks() -> None:
    fal = client(lambda r: httpx.Response(429, headers={"Retry-After": "7"}, json={"detail": "slow down"}))
    with pytest.raises(RetryableError) as caught:
        fal.submit({}, marker="j")
    assert caught.value.delay == 7.0 and caught.value.code == "fal_rate_limited"


def test_ingress_5xx_without_request_id_is_retryable() -> None:
    fal = client(lambda r: httpx.Response(502, text="<html><center>nginx</center></html>"))
    with pytest.raises(RetryableError) as caught:
        fal.submit({}, marker="j")
    assert caught.value.code == "fal_unavailable"


def test_runner_5xx_is_retryable_and_names_the_error_type() -> None:
    fal = client(
        lambda r: httpx.Response(
            503, headers={"x-fal-request-id": "r1", "X-Fal-Error-Type": "runner_unavailable"}, json={"detail": "busy"}
        )
    )
    with pytest.raises(RetryableError, match="runner_unavailable"):
        fal.status(REQUEST)


def test_lost_submit_answer_is_never_retried() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadError("connection closed", request=request)

    with pytest.raises(SubmitOutcomeUnknown) as caught:
        client(handler).submit({}, marker="j")
    assert not isinstance(caught.value, RetryableError)
    assert "paying twice" in caught.value.message


def test_connect_failure_on_submit_is_retryable_because_nothing_was_sent() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(RetryableError):
        client(handler).submit({}, marker="j")


def test_validation_error_is_permanent_and_readable() -> None:
    fal = client(
        lambda r: httpx.Response(
            422, json={"detail": [{"loc": ["body", "sync_mode"], "msg": "bad enum", "type": "enum"}]}
        )
    )
    with pytest.raises(InvalidInput, match="sync_mode: bad enum"):
        fal.submit({}, marker="j")


def test_unauthorised_key_pauses_the_account_and_the_key_is_not_in_the_message() -> None:
    # Issue 12 item 4: a refused key opens the account's breaker (retryable, never a failed job).
    fal = client(lambda r: httpx.Response(401, json={"detail": "no"}))
    with pytest.raises(AccountRefused) as caught:
        fal.submit({}, marker="j")
    assert "k-123456" not in str(caught.value)


def test_status_reads_queue_position_logs_and_failure() -> None:
    bodies = iter([
        (202, {"status": "IN_QUEUE", "queue_position": 4}),
        (202, {"status": "IN_PROGRESS",
               "logs": [{"message": "loading", "level": "INFO", "source": "user", "timestamp": "t"}]}),
        (200, {"status": "COMPLETED", "error": "runner died", "error_type": "runner_disconnected"}),
    ])  # fmt: skip

    def handler(request: httpx.Request) -> httpx.Response:
        code, body = next(bodies)
        return httpx.Response(code, json=body)

    fal = client(handler)
    assert fal.status(REQUEST).queue_position == 4
    assert fal.status(REQUEST).logs[0].message == "loading"
    done = fal.status(REQUEST)
    assert done.state is QueueState.completed and done.error_type == "runner_disconnected"


def test_result_before_completion_is_retryable_and_after_expiry_is_gone() -> None:
    fal = client(lambda r: httpx.Response(400, json={"detail": "Request is still in progress"}))
    with pytest.raises(RetryableError):
        fal.result(REQUEST)
    gone = client(lambda r: httpx.Response(404, json={"detail": "not found"}))
    with pytest.raises(FalError) as caught:
        gone.result(REQUEST)
    assert caught.value.code == "fal_request_gone"
