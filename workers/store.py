"""Store: stream fal's output into s3://BUCKET/outputs/{job_id}.mp4, probe it, complete the job.

The object appears only when its upload completes, so a half-written file is never an output.
"""

from __future__ import annotations

from lipsync.errors import InvalidInput, PermanentError, RetryableError
from lipsync.lifecycle import Advance
from lipsync.metrics import media_work
from lipsync.models import Job, JobOutput, JobStatus
from lipsync.probe import probe
from workers.context import Context
from workers.runner import Lease
from workers.transit import HashingWriter, spool


def output_key(ctx: Context, job_id: str) -> str:
    return f"{ctx.settings.output_prefix}/{job_id}.mp4"


def store(job: Job, ctx: Context, lease: Lease) -> Advance:
    assert job.fal is not None and job.fal.output is not None, "storing follows a fal result"
    source = job.fal.output.url
    with spool(ctx.settings.work_dir, suffix=".mp4") as (path, fileobj):
        writer = HashingWriter(fileobj, on_write=lease.heartbeat)
        try:
            with media_work("download"):
                ctx.fetcher.fetch_to_file(source, writer)
        except InvalidInput as exc:
            raise PermanentError(
                f"the output could not be downloaded from fal: {exc.message}", code="output_unavailable"
            ) from None
        fileobj.flush()
        expected = job.fal.output.file_size
        if expected is not None and expected != writer.size:
            # A cut transfer or a changed object: never store it as a success; fetch again.
            raise RetryableError(
                f"fal's output is {expected} bytes but {writer.size} arrived; fetching it again",
                code="output_size_mismatch",
            )
        try:
            with media_work("probe"):
                found = probe(path)
        except InvalidInput as exc:  # fal's output, not the user's input: it is not a video at all
            raise PermanentError(f"fal's output is not a video: {exc.message}", code="bad_output") from None
        if not found.has_video:
            raise PermanentError("fal's output has no video stream", code="bad_output")
        key = output_key(ctx, job.id)
        with media_work("upload"):
            ctx.storage.upload_file(
                path,
                key,
                content_type="video/mp4",
                metadata={
                    "job-id": job.id,
                    "fal-request-id": job.fal.request_id,
                    "video-sha256": job.inputs["video"].sha256,
                    "audio-sha256": job.inputs["audio"].sha256,
                    "output-sha256": writer.sha256,
                },
            )
    output = JobOutput(
        url=ctx.storage.uri(key),
        content_type="video/mp4",
        file_name=f"{job.id}.mp4",
        file_size=writer.size,
        width=found.width,
        height=found.height,
        fps=found.fps,
        duration=found.duration,
        num_frames=found.num_frames,
        fal_url=source,
    )
    return Advance(
        JobStatus.completed,
        fields={"output": output.model_dump(mode="json", exclude={"presigned_url"})},
        event=f"stored {output.url} ({found.duration:.2f}s)",
    )
