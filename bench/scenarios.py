"""The scenarios of issue 6, each a function of the stack and the scale, returning per-run
records and their spreads. Comparisons are ratios taken within one repetition."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from bench.baselines.run import run_blocking, run_subscribe_pool
from bench.measure import CpuMeter, RssProbe, Sampler, summarise, tree
from bench.media import audio_for, big_video, tiny_inputs
from bench.pipeline import Inputs, run_jobs, upload_inputs
from bench.profile import PySpy
from bench.stack import BUCKET, BenchStack

Log = Callable[[str], None]


@dataclass(frozen=True)
class Scale:
    name: str
    reps: int
    overhead_jobs: int
    overhead_latency: float
    baseline_width: int
    inflight_jobs: int
    inflight_latency: float
    inflight_reps: int
    inflight_hold_s: float
    ceiling_jobs: int
    big_sizes_mb: tuple[int, ...]
    big_reps: tuple[int, ...]


SCALES = {
    "smoke": Scale("smoke", 1, 4, 0.5, 4, 6, 1.0, 1, 1.0, 4, (2,), (1,)),
    "small": Scale("small", 2, 60, 5.0, 20, 300, 10.0, 1, 10.0, 100, (20, 50), (2, 1)),
    "full": Scale("full", 2, 1000, 60.0, 200, 5000, 60.0, 1, 60.0, 600, (100, 500, 2048), (3, 2, 1)),
}
# With fal's webhooks doing the reacting, polls are only the safety net for a lost webhook:
# the first poll and the cap move out (a lost webhook then costs at most two minutes, well
# inside fal's six-minute retention of large results).
WEBHOOK_ENV = {
    "LIPSYNC_POLL_INITIAL_S": "10",
    "LIPSYNC_POLL_MAX_S": "120",
}

OVERHEAD_KEYS = (
    "makespan_s", "limit_s", "makespan_over_limit", "makespan_over_latency", "bytes_s",
    "overhead_p50_s", "overhead_p95_s", "overhead_p99_s", "worker_cpu_ms_per_job",
    "orchestration_cpu_ms_per_job", "media_cpu_ms_per_job", "redis_commands_per_job", "redis_scripts_per_job",
    "polls_per_job", "peak_worker_pss_mb", "jobs_per_s",
)  # fmt: skip
BASELINE_KEYS = (
    "makespan_s", "overhead_p50_s", "overhead_p95_s", "worker_cpu_ms_per_job", "peak_worker_pss_mb",
    "redis_commands_per_job", "status_polls_per_job", "jobs_per_s",
)  # fmt: skip


def tiny(stack: BenchStack) -> Inputs:
    from config.settings import get_settings
    from lipsync.storage import Storage

    video, audio = tiny_inputs(stack.workdir / "media")
    return upload_inputs(Storage(get_settings()), video, audio)


def _s3() -> Any:
    from config.settings import get_settings
    from lipsync.storage import Storage

    return Storage(get_settings()).client


def bytes_pass(inputs: Inputs, jobs: int, output_bytes: int, width: int = 8) -> float:
    """The bytes' own transfer time: plain boto3, `width` threads, moving what the jobs move
    through S3 (staging reads both inputs, fal reads them again, store writes the output)."""
    client = _s3()
    video_key = inputs.video_uri.split("/", 3)[3]
    audio_key = inputs.audio_uri.split("/", 3)[3]
    body = os.urandom(output_bytes)

    def one(index: int) -> None:
        for _ in range(2):
            client.get_object(Bucket=BUCKET, Key=video_key)["Body"].read()
            client.get_object(Bucket=BUCKET, Key=audio_key)["Body"].read()
        client.put_object(Bucket=BUCKET, Key=f"bench-bytes/{index}.mp4", Body=body)

    started = time.monotonic()
    with ThreadPoolExecutor(width) as pool:
        list(pool.map(one, range(jobs)))
    return time.monotonic() - started


# 1 + 5: overhead at N jobs, with both baselines on the same jobs in the same repetition ------------
def overhead(stack: BenchStack, scale: Scale, log: Log, *, baselines: bool = True) -> dict[str, Any]:
    inputs = tiny(stack)
    n, latency, width = scale.overhead_jobs, scale.overhead_latency, scale.baseline_width
    runs: list[dict[str, Any]] = []
    for rep in range(scale.reps):
        log(f"overhead rep {rep + 1}/{scale.reps}: pipeline, {n} jobs, L={latency}s")
        ours = run_jobs(stack, jobs=n, latency=latency, inputs=inputs, timeout=600 + n)
        output_bytes = int(ours.get("output_bytes") or inputs.video_bytes)
        ours["bytes_s"] = bytes_pass(inputs, n, output_bytes)
        ours["limit_s"] = latency + ours["bytes_s"]
        ours["makespan_over_limit"] = ours["makespan_s"] / ours["limit_s"]
        ours["makespan_over_latency"] = ours["makespan_s"] / latency
        record: dict[str, Any] = {"pipeline": ours}
        log(_brief("pipeline", ours))
        log(f"overhead rep {rep + 1}: pipeline with fal webhooks through the gateway")
        hooked = run_jobs(
            stack, jobs=n, latency=latency, inputs=inputs, timeout=600 + n, webhooks=True, env=WEBHOOK_ENV
        )
        hooked["limit_s"] = ours["limit_s"]
        hooked["makespan_over_limit"] = hooked["makespan_s"] / ours["limit_s"]
        hooked["makespan_over_latency"] = hooked["makespan_s"] / latency
        record["pipeline_webhooks"] = hooked
        log(_brief("pipeline_webhooks", hooked))
        if baselines:
            log(f"overhead rep {rep + 1}: baseline (a) fal-client subscribe pool, {width} threads")
            record["subscribe_pool"] = run_subscribe_pool(
                stack, jobs=n, width=width, latency=latency, inputs=inputs, timeout=1800 + 10 * n
            )
            log(_brief("subscribe_pool", record["subscribe_pool"]))
            log(f"overhead rep {rep + 1}: baseline (b) blocking Celery task, {width} threads")
            record["blocking_celery"] = run_blocking(
                stack, jobs=n, width=width, latency=latency, inputs=inputs, timeout=1800 + 10 * n
            )
            log(_brief("blocking_celery", record["blocking_celery"]))
            record["ratios"] = {
                f"{metric}:{name}": record[name][metric] / max(1e-9, ours[metric])
                for name in ("subscribe_pool", "blocking_celery")
                for metric in ("makespan_s", "worker_cpu_ms_per_job", "overhead_p95_s")
            }
            record["ratios"].update({
                f"{metric}:{name}:webhooks": record[name][metric] / max(1e-9, hooked[metric])
                for name in ("subscribe_pool", "blocking_celery")
                for metric in ("makespan_s", "worker_cpu_ms_per_job", "overhead_p95_s")
            })  # fmt: skip
        runs.append(record)
    result: dict[str, Any] = {
        "jobs": n, "latency_s": latency, "baseline_width": width,
        "runs": runs,
        "pipeline": summarise([r["pipeline"] for r in runs], OVERHEAD_KEYS),
        "pipeline_webhooks": summarise([r["pipeline_webhooks"] for r in runs], OVERHEAD_KEYS),
    }  # fmt: skip
    if baselines:
        for name in ("subscribe_pool", "blocking_celery"):
            result[name] = summarise([r[name] for r in runs], BASELINE_KEYS)
        result["ratios"] = summarise([r["ratios"] for r in runs], runs[0]["ratios"].keys())
    return result


# 2: in flight -------------------------------------------------------------------------------------
def inflight(stack: BenchStack, scale: Scale, log: Log) -> dict[str, Any]:
    inputs = tiny(stack)
    n, latency = scale.inflight_jobs, scale.inflight_latency
    runs = []
    for rep in range(scale.inflight_reps):
        log(f"in-flight rep {rep + 1}/{scale.inflight_reps}: {n} jobs, L={latency}s")
        run = run_jobs(stack, jobs=n, latency=latency, inputs=inputs, timeout=1800 + n, hold_s=scale.inflight_hold_s)
        run.update(waiting_cpu(run))
        log(_brief("pipeline", run) + f" peak at fal {run['peak_at_fal']:.0f}")
        runs.append(run)
    keys = (
        "peak_at_fal", "waiting_at_fal", "peak_worker_pss_mb", "peak_worker_rss_mb", "makespan_s", "submit_s",
        "stage_rate_per_s", "all_waiting_after_s", "api_cpu_while_waiting", "transfer_cpu_while_waiting",
        "polls_per_s_while_waiting", "pss_while_waiting_mb", "worker_cpu_ms_per_job", "polls_per_job",
    )  # fmt: skip
    return {
        "jobs": n, "latency_s": latency, "hold_s": scale.inflight_hold_s,
        "runs": runs, "pipeline": summarise(runs, keys),
    }  # fmt: skip


def waiting_cpu(run: dict[str, Any]) -> dict[str, float]:
    """The plateau's figures, flat: CPU (cores) and memory of the workers while every job waits."""
    plateau = run.get("plateau") or {}
    cores = plateau.get("cpu_cores", {})
    return {
        "waiting_at_fal": plateau.get("waiting_at_fal", 0),
        "api_cpu_while_waiting": cores.get("api", float("nan")),
        "transfer_cpu_while_waiting": cores.get("transfer", float("nan")),
        "polls_per_s_while_waiting": plateau.get("status_polls_per_s", float("nan")),
        "pss_while_waiting_mb": plateau.get("pss_mb", float("nan")),
        "all_waiting_after_s": plateau.get("all_waiting_after_s", float("nan")),
        "stage_rate_per_s": run["jobs"] / max(1e-6, run["stage_span_s"]) if run.get("stage_span_s") else 0.0,
    }


# 3: throughput ceiling, with a profile of the workers ---------------------------------------------
def ceiling(stack: BenchStack, scale: Scale, log: Log, *, profile: bool = True) -> dict[str, Any]:
    inputs = tiny(stack)
    n = scale.ceiling_jobs
    runs = []
    for rep in range(scale.reps):
        log(f"ceiling rep {rep + 1}/{scale.reps}: {n} jobs, L=0")
        run = run_jobs(stack, jobs=n, latency=0.0, inputs=inputs, timeout=600 + n)
        log(_brief("pipeline", run))
        runs.append(run)
    keys = ("jobs_per_s", "makespan_s", "worker_cpu_ms_per_job", "redis_commands_per_job", "polls_per_job")
    result: dict[str, Any] = {"jobs": n, "runs": runs, "pipeline": summarise(runs, keys)}
    # Where the machine's CPU went, by process, median over the runs: what saturates first.
    names = runs[0]["cpu_ms_per_job"].keys()
    result["cpu_ms_per_job_by_process"] = summarise([r["cpu_ms_per_job"] for r in runs], names)
    if profile:
        log(f"ceiling: profiled run ({n} jobs) with py-spy on the workers")
        spy = PySpy(stack.workdir / "profile")
        run = run_jobs(stack, jobs=n, latency=0.0, inputs=inputs, timeout=600 + n, on_workers=spy.attach)
        result["profile"] = run.pop("profile")
        result["profiled_run"] = {k: v for k, v in run.items() if k != "series"}
    return result


# 4: big media ---------------------------------------------------------------------------------------
def bigmedia(stack: BenchStack, scale: Scale, log: Log) -> dict[str, Any]:
    from config.settings import get_settings
    from lipsync.storage import Storage
    from producers.api import LipsyncClient

    storage = Storage(get_settings())
    folder = stack.workdir / "big"
    folder.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, Any] = {}
    for size_mb, reps in zip(scale.big_sizes_mb, scale.big_reps, strict=True):
        free = shutil.disk_usage(folder).free
        if free < 9 * size_mb * 2**20:
            log(f"big media {size_mb} MB skipped: {free / 2**30:.1f} GB free, about {9 * size_mb / 1024:.1f} GB needed")
            sizes[str(size_mb)] = {"skipped": f"not enough disk ({free / 2**30:.1f} GB free)"}
            continue
        video, seconds = big_video(folder / f"big-{size_mb}.mp4", size_mb * 2**20)
        audio = audio_for(folder / f"big-{size_mb}.wav", seconds)
        inputs = upload_inputs(storage, video, audio, prefix="bench-big")
        raw_copy = folder / "raw-download.bin"
        runs = []
        for rep in range(reps):
            log(f"big media {size_mb} MB rep {rep + 1}/{reps}: raw boto3, then one job")
            client = _s3()
            started = time.monotonic()
            client.upload_file(str(video), BUCKET, "bench-raw/upload.mp4")
            raw_up = time.monotonic() - started
            started = time.monotonic()
            client.download_file(BUCKET, "bench-raw/upload.mp4", str(raw_copy))
            raw_down = time.monotonic() - started
            raw_copy.unlink(missing_ok=True)
            client.delete_object(Bucket=BUCKET, Key="bench-raw/upload.mp4")
            try:
                run = big_job(stack, inputs, LipsyncClient)
            except RuntimeError as exc:  # a failed job is a result too; the other sizes still run
                log(f"  {exc}")
                runs.append({"error": str(exc)})
                cleanup_outputs(stack, storage)
                continue
            size = inputs.video_bytes
            run.update({
                "video_bytes": size,
                "raw_upload_s": raw_up,
                "raw_download_s": raw_down,
                "raw_mb_per_s": size / 2**20 / (raw_up + raw_down),
                "stage_mb_per_s": size / 2**20 / run["stage_s"],
                "store_mb_per_s": run["output_bytes"] / 2**20 / run["store_s"],
            })  # fmt: skip
            run["stage_vs_raw"] = run["stage_mb_per_s"] / run["raw_mb_per_s"]
            run["store_vs_raw"] = run["store_mb_per_s"] / run["raw_mb_per_s"]
            log(
                f"  raw {run['raw_mb_per_s']:.0f} MB/s (up {raw_up:.1f}s, down {raw_down:.1f}s); "
                f"stage {run['stage_mb_per_s']:.0f} MB/s ({run['stage_vs_raw']:.2f}x), "
                f"store {run['store_mb_per_s']:.0f} MB/s "
                f"({run['store_vs_raw']:.2f}x); peak transfer process RSS {run['peak_process_rss_mb']:.0f} MB"
            )
            runs.append(run)
            cleanup_outputs(stack, storage)
        keys = (
            "raw_mb_per_s", "stage_mb_per_s", "store_mb_per_s", "stage_vs_raw", "store_vs_raw",
            "peak_process_rss_mb", "peak_tree_pss_mb", "transfer_cpu_s", "stage_s", "store_s",
        )  # fmt: skip
        sizes[str(size_mb)] = {
            "video_bytes": inputs.video_bytes,
            "seconds": seconds,
            "runs": runs,
            **summarise([run for run in runs if "error" not in run], keys),
        }
        storage.delete(inputs.video_uri.split("/", 3)[3])
        for path in (video, video.with_suffix(".gop.mp4")):
            path.unlink(missing_ok=True)
    return {"sizes": sizes}


def big_job(stack: BenchStack, inputs: Inputs, client_class: Any) -> dict[str, Any]:
    """One big job through fresh workers; the transfer worker's memory sampled five times a second."""
    from config.settings import Settings
    from lipsync.models import JobStatus, LipsyncInput

    stack.fresh(0.0)
    workers = stack.start_workers()
    client = client_class(Settings())
    try:
        transfer = workers.pids()["transfer"]
        meter = CpuMeter({"transfer": transfer}).start()
        with Sampler({"transfer": RssProbe(transfer)}, interval=0.2) as sampler:
            idle_rss = max((p.memory_info().rss for p in tree(transfer)), default=0)
            job = client.submit_request(LipsyncInput(video_url=inputs.video_uri, audio_url=inputs.audio_uri))
            (job,) = client.wait([job.id], timeout_s=3600, interval_s=0.5)
        cpu = meter.stop()
    finally:
        workers.stop()
        client.close()
    if job.status is not JobStatus.completed:
        raise RuntimeError(f"the big job ended {job.status.value}: {job.error}")
    assert job.output is not None
    ts = job.timestamps
    return {
        "stage_s": ts["submitting"] - ts["staging"],
        "store_s": ts["completed"] - ts["storing"],
        "fal_s": ts["storing"] - ts["submitting"],
        "output_bytes": job.output.file_size,
        "idle_process_rss_mb": idle_rss / 2**20,
        "peak_process_rss_mb": sampler.peak("transfer.rss_max_process") / 2**20,
        "peak_tree_pss_mb": sampler.peak("transfer.pss") / 2**20,
        "transfer_cpu_s": cpu["transfer"],
    }


def cleanup_outputs(stack: BenchStack, storage: Any) -> None:
    """Staged and stored copies and the emulator's outputs go, so each repetition moves every byte."""
    for prefix in ("staging/", "outputs/"):
        listing = storage.client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
        for item in listing.get("Contents", []):
            storage.client.delete_object(Bucket=BUCKET, Key=item["Key"])
    assert stack.emulator is not None
    for folder in stack.emulator.data_dir.iterdir():
        if folder.is_dir() and folder.name != "tls":
            shutil.rmtree(folder, ignore_errors=True)


def _brief(name: str, run: dict[str, Any]) -> str:
    return (
        f"  {name}: {run['completed']}/{run['jobs']} done, makespan {run['makespan_s']:.1f}s, "
        f"p95 overhead {run['overhead_p95_s']:.2f}s, worker CPU {run['worker_cpu_ms_per_job']:.1f} ms/job"
        + (
            f" (orchestration {run['orchestration_cpu_ms_per_job']:.1f})"
            if run.get("orchestration_cpu_ms_per_job") is not None
            else ""
        )
        + ", "
        f"peak worker PSS {run.get('peak_worker_pss_mb', 0):.0f} MB"
        + (f", errors {run['errors']}" if run.get("errors") else "")
    )
