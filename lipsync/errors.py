"""One error hierarchy; the decision that matters is made once: is it worth retrying?"""

from __future__ import annotations


class LipsyncError(Exception):
    """Base of every error this system raises on purpose.

    `code` is a stable machine-readable name; the message is for a person.
    """

    code: str = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


class RetryableError(LipsyncError):
    """Transient: try again, after `delay` seconds if the other side said so."""

    code = "transient"

    def __init__(self, message: str, *, code: str | None = None, delay: float | None = None) -> None:
        super().__init__(message, code=code)
        self.delay = delay


class PermanentError(LipsyncError):
    """Trying again cannot help: the job fails with this code and message."""

    code = "permanent"


class InvalidInput(PermanentError):
    """The producer's request or media is not acceptable."""

    code = "invalid_input"


class UnsafeURL(InvalidInput):
    """A URL the guarded fetcher refuses to reach."""

    code = "unsafe_url"


class TooLarge(InvalidInput):
    code = "too_large"


class FalError(PermanentError):
    """fal answered that the request failed; carries fal's own error type."""

    code = "fal_error"

    def __init__(self, message: str, *, error_type: str | None = None, code: str | None = None):
        super().__init__(message, code=code)
        self.error_type = error_type


class InputDownloadFailed(FalError):
    """fal could not download one of the job's inputs (fal's model error type `file_download_error`).

    The model never ran on that request. Usually our own S3 (a presigned URL) was out of fal's
    reach for a while, so the job is submitted again with fresh URLs, a bounded number of times
    (`lipsync.jobs.after_input_download_failure`); only then does it fail with this code."""

    code = "input_download_failed"

    def __init__(self, message: str, *, input_name: str, fal_message: str) -> None:
        super().__init__(message, error_type="file_download_error")
        self.input_name = input_name
        self.fal_message = fal_message


class JobNotFound(LipsyncError):
    code = "job_not_found"


class IdempotencyConflict(InvalidInput):
    code = "idempotency_conflict"


class InvalidTransition(LipsyncError):
    """A job was asked to move to a status its current status does not lead to."""

    code = "invalid_transition"


def describe_validation_error(exc: Exception) -> str:
    """A pydantic ValidationError in one line a person can act on."""
    errors = getattr(exc, "errors", None)
    if errors is None:
        return str(exc)
    parts = []
    for error in errors():
        location = ".".join(str(p) for p in error.get("loc", ()))
        message = error.get("msg", "invalid")
        if error.get("type") == "extra_forbidden":
            message = "is not a known field"
        parts.append(f"{location}: {message}" if location else message)
    return "; ".join(parts)
