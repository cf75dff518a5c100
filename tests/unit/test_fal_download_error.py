"""fal's model error `file_download_error` (fal docs, "Model Errors"): read from the result's body,
`{"detail": [{"loc": ["body", field], "msg", "type"}]}`, branching on `type`, never on `msg`."""

from __future__ import annotations

import httpx

from lipsync.errors import InputDownloadFailed, InvalidInput
from lipsync.fal import FILE_DOWNLOAD_ERROR, FalQueueClient, download_failure

DOWNLOAD_FAILED = {
    "detail": [
        {
            "loc": ["body", "audio_url"],
            "msg": "Failed to download the file. Please check if the URL is accessible",
            "type": FILE_DOWNLOAD_ERROR,
            "url": "https://docs.fal.ai/errors/#file_download_error",
        }
    ]
}


def test_a_file_download_error_names_the_input_and_keeps_fals_words() -> None:
    failure = download_failure(DOWNLOAD_FAILED)
    assert isinstance(failure, InputDownloadFailed)
    assert failure.code == "input_download_failed" and failure.error_type == FILE_DOWNLOAD_ERROR
    assert failure.input_name == "audio_url"
    assert failure.fal_message.startswith("Failed to download the file")


def test_other_model_errors_and_other_shapes_are_not_download_failures() -> None:
    face = {"detail": [{"loc": ["body", "video_url"], "msg": "No face detected", "type": "face_detection_error"}]}
    assert download_failure(face) is None
    assert download_failure({"detail": "Failed to download the file"}) is None  # branch on type, not msg
    assert download_failure({"detail": "Request timed out", "error_type": "request_timeout"}) is None
    assert download_failure(None) is None
    assert download_failure(None, "Failed to download video_url") is not None  # a status said so


def test_the_result_answer_of_a_failed_download_is_not_an_invalid_input() -> None:
    answer = httpx.Response(422, json=DOWNLOAD_FAILED, headers={"x-fal-request-id": "req-1"})
    assert isinstance(FalQueueClient._error(answer, "result"), InputDownloadFailed)
    invalid = {"detail": [{"loc": ["body", "sync_mode"], "msg": "bad", "type": "enum"}]}
    assert type(FalQueueClient._error(httpx.Response(422, json=invalid), "result")) is InvalidInput
