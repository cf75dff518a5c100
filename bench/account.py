"""`python -m bench.account`: issue 12's `account` scenario at a reduced scale, on the bench's own stack.

An emulated fal account with concurrency C and model time L; tenant A submits N jobs, tenant B a few
jobs D seconds later; midway the account is locked for a while, then topped up. Measured: failed
jobs, duplicate requests, jobs waiting at fal (sampled), B's time to done, the makespan against
the account's own bound (N_total × L / C), and the lock (refusals, resume after the top-up).
The full-scale figures of the issue (C 10, L 30 s, 2,000 + 20 jobs, a 60 s lock) are this with
`--jobs 2000 --latency 30 --lock 60`.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import click

from bench.media import tiny_inputs
from bench.pipeline import upload_inputs
from bench.stack import BenchStack

HERE = Path(__file__).resolve().parent


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))] if ordered else float("nan")


@click.command()
@click.option("--concurrency", default=10, show_default=True)
@click.option("--latency", default=5.0, show_default=True, help="L, the model's time per job, s")
@click.option("--jobs", "a_jobs", default=150, show_default=True, help="tenant A's batch")
@click.option("--b-jobs", default=10, show_default=True)
@click.option("--b-after", default=15.0, show_default=True, help="B submits this many seconds after A")
@click.option("--lock", "lock_s", default=10.0, show_default=True, help="account locked this long, midway")
@click.option("--probe", "probe_s", default=2.0, show_default=True, help="LIPSYNC_FAL_ACCOUNT_PROBE_S (and max)")
@click.option("--out", type=click.Path(path_type=Path), default=HERE / "results" / "account-small.json")
def main(
    concurrency: int, latency: float, a_jobs: int, b_jobs: int, b_after: float, lock_s: float, probe_s: float, out: Path
) -> None:
    from config.settings import Settings
    from lipsync.models import JobStatus
    from lipsync.storage import Storage
    from producers.api import LipsyncClient

    workdir = Path(tempfile.mkdtemp(prefix="bench-account-"))
    stack = BenchStack(workdir).start()
    try:
        stack.fresh(latency)
        emulator = stack.emulator
        assert emulator is not None
        emulator.configure(concurrency=concurrency)
        env = {
            "LIPSYNC_FAL_QUEUE_BUFFER": "4",
            "LIPSYNC_FAL_CONCURRENCY_HINT": str(concurrency),
            "LIPSYNC_MAX_IN_FLIGHT": "10000",
            "LIPSYNC_SUBMITS_PER_SECOND": "20",
            "LIPSYNC_FAL_ACCOUNT_PROBE_S": str(probe_s),
            "LIPSYNC_FAL_ACCOUNT_PROBE_MAX_S": str(probe_s),
        }
        workers = stack.start_workers(env=env)
        settings = Settings()
        inputs = upload_inputs(Storage(settings), *tiny_inputs(workdir / "media"))
        client = LipsyncClient(settings)
        samples: list[dict[str, float]] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                account = emulator.counters()
                samples.append({
                    "at": time.time(), "in_queue": account["in_queue"], "in_progress": account["in_progress"],
                    "created": account["created"], "locked_refusals": account.get("locked_refusals", 0),
                })  # fmt: skip
                stop.wait(0.25)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.time()
        a_ids = [client.submit(inputs.video_uri, inputs.audio_uri, tenant="a").id for _ in range(a_jobs)]
        time.sleep(max(0.0, started + b_after - time.time()))
        b_ids = [client.submit(inputs.video_uri, inputs.audio_uri, tenant="b").id for _ in range(b_jobs)]
        lock_at = started + (a_jobs + b_jobs) * latency / concurrency / 2
        time.sleep(max(0.0, lock_at - time.time()))
        refusals_before = emulator.counters().get("locked_refusals", 0)
        locked_at = time.time()
        emulator.lock(lock_s)
        time.sleep(lock_s)
        emulator.unlock()
        unlocked_at = time.time()
        refusals = emulator.counters().get("locked_refusals", 0) - refusals_before
        ids = a_ids + b_ids
        deadline = time.monotonic() + 600 + 4 * len(ids) * latency / concurrency
        while time.monotonic() < deadline:
            statuses = client.store.statuses(ids)
            if all(s is not None and s.terminal for s in statuses.values()):
                break
            time.sleep(1)
        finished = time.time()
        stop.set()
        sampler.join()
        workers.stop()
        # Submit tasks run (Celery logs each one received): about 1 a job when no job spins.
        submit_tasks = sum(
            len(re.findall(r"Task lipsync\.submit\[[^\]]*\] received", Path(log).read_text(errors="replace")))
            for log in workers.logs.values()
        )
        jobs = {job.id: job for job in client.store.get_many(ids)}
        by_marker: dict[str, int] = emulator.counters()["by_marker"]
        b_times = [
            jobs[i].timestamps["completed"] - jobs[i].created_at for i in b_ids if "completed" in jobs[i].timestamps
        ]
        # Where B's time went: staging (created to submitting, the transfer queue) and waiting for
        # a slot (submitting to submitted, the fair queue).
        b_jobs_done = [jobs[i] for i in b_ids if "submitted" in jobs[i].timestamps]
        b_staging = [j.timestamps["submitting"] - j.created_at for j in b_jobs_done if "submitting" in j.timestamps]
        b_slot_wait = [
            j.timestamps["submitted"] - j.timestamps["submitting"] for j in b_jobs_done if "submitting" in j.timestamps
        ]
        created_after = [
            s["at"] for s in samples if s["at"] > unlocked_at and s["created"] > _created_at(samples, unlocked_at)
        ]
        bound = (a_jobs + b_jobs) * latency / concurrency
        makespan = max(j.timestamps.get("completed", finished) for j in jobs.values()) - started
        result: dict[str, Any] = {
            "parameters": {
                "concurrency": concurrency, "latency_s": latency, "a_jobs": a_jobs, "b_jobs": b_jobs,
                "b_after_s": b_after, "lock_s": lock_s, "probe_s": probe_s,
            },
            "failed": sum(j.status is JobStatus.failed for j in jobs.values()),
            "completed": sum(j.status is JobStatus.completed for j in jobs.values()),
            "duplicate_requests": sum(max(0, by_marker.get(i, 0) - 1) for i in ids),
            "max_waiting_at_fal": max(s["in_queue"] for s in samples),
            "max_running_at_fal": max(s["in_progress"] for s in samples),
            "b_p95_s": percentile(b_times, 95),
            "b_p95_over_latency": percentile(b_times, 95) / latency,
            "b_p95_staging_s": percentile(b_staging, 95),
            "b_p95_waiting_for_a_slot_s": percentile(b_slot_wait, 95),
            "makespan_s": makespan,
            "account_bound_s": bound,
            "makespan_over_bound": makespan / bound,
            "makespan_less_lock_over_bound": (makespan - lock_s) / bound,
            "submit_tasks": submit_tasks,
            "submit_tasks_per_job": submit_tasks / len(ids),
            "lock_refusals": refusals,
            "lock_refusals_allowed": lock_s / probe_s + 1,
            "resumed_after_top_up_s": (min(created_after) - unlocked_at) if created_after else None,
            "locked_at_s": locked_at - started,
        }  # fmt: skip
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        click.echo(json.dumps(result, indent=2))
    finally:
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _created_at(samples: list[dict[str, float]], moment: float) -> float:
    before = [s["created"] for s in samples if s["at"] <= moment]
    return before[-1] if before else 0.0


if __name__ == "__main__":
    main()
