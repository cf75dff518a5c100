"""The job as a tenant sees it: what the gateway answers and what a callback carries.

fal's signed URLs, staging keys, the owner and internal bookkeeping stay out; the tenant's
own idempotency key is shown without the gateway's per-tenant namespace.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from lipsync.models import FalPriority, Job, JobError, JobOutput, JobStatus, LipsyncInput


class FalOutputFile(BaseModel):
    """What fal said of the video it made (its `File`), next to our stored copy in `output`.

    fal's URL is left out: the stored copy is the deliverable, and fal's copy expires.
    """

    content_type: str | None = None
    file_name: str | None = None
    file_size: int | None = Field(default=None, description="bytes, as fal reported them")


class PublicJob(BaseModel):
    id: str
    status: JobStatus
    request: LipsyncInput
    idempotency_key: str | None = None
    batch_id: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    callback_url: str | None = None
    fal_priority: FalPriority | None = None
    fal_request_id: str | None = None
    fal_gateway_request_id: str | None = Field(
        default=None, description="fal's id of the request's latest try; quote it to fal's support"
    )
    fal_output: FalOutputFile | None = None
    output: JobOutput | None = None
    error: JobError | None = None
    cost_estimate_usd: float | None = None
    expected_duration: float | None = None
    attempts: dict[str, int] = Field(default_factory=dict)
    created_at: float
    updated_at: float
    deadline_at: float
    timestamps: dict[str, float] = Field(default_factory=dict)


def tenant_idempotency_key(tenant: str, key: str) -> str:
    """Idempotency keys live in one namespace per tenant: another tenant's key never matches."""
    return f"tenant:{tenant}:{key}"


def public_job(job: Job) -> PublicJob:
    key = job.idempotency_key
    if key is not None and job.tenant is not None:
        key = key.removeprefix(f"tenant:{job.tenant}:")
    return PublicJob(
        id=job.id,
        status=job.status,
        request=job.request,
        idempotency_key=key,
        batch_id=job.batch_id,
        metadata=job.metadata,
        callback_url=job.callback_url,
        fal_priority=job.fal_priority,
        fal_request_id=job.fal.request_id if job.fal else None,
        fal_gateway_request_id=job.fal.gateway_request_id if job.fal else None,
        fal_output=(
            FalOutputFile.model_validate(job.fal.output.model_dump(include={"content_type", "file_name", "file_size"}))
            if job.fal is not None and job.fal.output is not None
            else None
        ),
        output=job.output,
        error=job.error,
        cost_estimate_usd=job.cost_estimate_usd,
        expected_duration=job.expected_duration,
        attempts=job.attempts,
        created_at=job.created_at,
        updated_at=job.updated_at,
        deadline_at=job.deadline_at,
        timestamps=job.timestamps,
    )
