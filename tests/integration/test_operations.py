"""Running it like production: after a small batch, the workers' /metrics report the jobs, Flower's
API lists the tasks and workers (and only with its password), `lipsync stats` has the figures, the
logs carry the ids, and `lipsync dev up`/`down` leaves nothing running behind."""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lipsync.models import Job, JobStatus
from producers.devstack import free_port, metrics_port, port_open, spawn_flower, stop_process, wait_for_port
from tests.fixtures.cli import lipsync

pytestmark = pytest.mark.usefixtures("workers")


@pytest.fixture(scope="module")
def flower(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """Flower as `lipsync flower` runs it (basic auth), started before the batch so it sees its tasks."""
    port = free_port()
    auth = f"ops:{secrets.token_urlsafe(8)}"
    log = (tmp_path_factory.mktemp("flower") / "flower.log").open("ab")
    process = spawn_flower(port, stack_env, auth, log=log)
    try:
        wait_for_port(port, timeout=60, process=process)
        # Its event consumer connects after the port opens: it is connected once it has heard
        # the workers' heartbeats (the list without refresh comes from events alone).
        user, password = auth.split(":", 1)
        deadline = time.monotonic() + 60
        known: set[str] = set()
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                answer = httpx.get(f"http://127.0.0.1:{port}/api/workers", auth=(user, password), timeout=10)
                known = set(answer.json()) if answer.status_code == 200 else set()
            if any(n.startswith("transfer-") for n in known) and any(n.startswith("api-") for n in known):
                break
            time.sleep(0.2)
        else:
            raise TimeoutError(f"Flower heard no worker's events within 60 s (knows {sorted(known)})")
        yield f"http://127.0.0.1:{port}", auth
    finally:
        stop_process(process)


Totals = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def quiet(client: Any) -> None:
    """No job of an earlier test still moving: what the metrics and `stats` gain over the batch
    is then the batch's own (a job left at fal by an earlier module once ended during it)."""
    deadline = time.monotonic() + 180
    while True:
        moving = {status: n for status, n in client.store.counts().items() if n and not JobStatus(status).terminal}
        if not moving:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"jobs of earlier tests still not ended after 180 s, by status: {moving}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def metrics_before(flower: tuple[str, str], workers: Any, quiet: None) -> tuple[Totals, Totals]:
    """The workers' metrics just before the batch: the test checks what the batch itself added."""
    return scrape_workers(workers)


@pytest.fixture(scope="module")
def stats_before(flower: tuple[str, str], stack_env: dict[str, str], quiet: None) -> dict[str, Any]:
    """`lipsync stats` just before the batch, for the same reason."""
    result = lipsync(stack_env, "stats", "--minutes", "30", "--json")
    assert result.returncode == 0, result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


@pytest.fixture(scope="module")
def batch(
    flower: tuple[str, str],
    metrics_before: tuple[Totals, Totals],
    stats_before: dict[str, Any],
    client: Any,
    media: dict[str, str],
) -> list[Job]:
    """One job that completes and one whose 'video' is audio only, so it fails in staging."""
    jobs = [
        client.submit(media["video_3s"], media["audio_5s"], sync_mode="cut_off"),
        client.submit(media["audio_3s"], media["audio_5s"], sync_mode="loop"),
    ]
    finished: list[Job] = client.wait([job.id for job in jobs], timeout_s=120)
    assert [job.status for job in finished] == [JobStatus.completed, JobStatus.failed]
    return finished


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert response.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def scrape_workers(workers: Any) -> tuple[Totals, Totals]:
    """(counters summed over the worker processes, gauges read from the job store)."""
    totals: Totals = {}
    gauges: Totals = {}
    for process in workers.processes.values():
        for key, value in scrape(metrics_port(process)).items():
            if key[0].startswith(("lipsync_jobs", "lipsync_schedule")):
                gauges[key] = value  # read from the job store: the same on every worker
            else:
                totals[key] = totals.get(key, 0.0) + value
    return totals, gauges


def test_worker_metrics_endpoints_report_the_batch(
    batch: list[Job], workers: Any, metrics_before: tuple[Totals, Totals]
) -> None:
    """What this batch of two added, exactly: not cumulative totals that any earlier test could satisfy."""
    completed, failed = batch
    before, gauges_before = metrics_before

    def added(now: Totals, name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return now.get(key, 0.0) - before.get(key, 0.0)

    def gauge(gauges: Totals, status: str) -> float:
        return gauges.get(("lipsync_jobs", (("status", status),)), 0.0)

    expected = {
        ("lipsync_job_transitions_total", "status", "completed"): 1,
        ("lipsync_job_transitions_total", "status", "failed"): 1,
        ("lipsync_status_seconds_count", "status", "storing"): 1,
        ("lipsync_job_seconds_count", "status", "completed"): 1,
        ("lipsync_fal_queue_wait_seconds_count", "", ""): 1,
        ("lipsync_fal_inference_seconds_count", "", ""): 1,
    }
    # Metrics are written around the transitions the batch waited for: read until they settle.
    deadline = time.monotonic() + 15
    while True:
        totals, gauges = scrape_workers(workers)
        found = {key: added(totals, key[0], **({key[1]: key[2]} if key[1] else {})) for key in expected}
        if found == expected or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert found == expected
    assert added(totals, "lipsync_job_failures_total", code="invalid_input", stage="stage") == 1
    assert added(totals, "lipsync_status_seconds_count", status="staging") == 2
    assert added(totals, "lipsync_estimated_spend_usd_total") == pytest.approx(completed.cost_estimate_usd or 0)
    assert (completed.cost_estimate_usd or 0) > 0
    assert added(totals, "lipsync_output_seconds_total") == pytest.approx(3.0, abs=0.05)
    assert added(totals, "lipsync_bytes_total", direction="in") >= sum(m.size for m in completed.inputs.values())
    assert completed.output is not None
    assert added(totals, "lipsync_bytes_total", direction="out") >= completed.output.file_size
    assert gauge(gauges, "completed") - gauge(gauges_before, "completed") == 1
    assert gauge(gauges, "failed") - gauge(gauges_before, "failed") == 1
    assert ("lipsync_jobs_at_fal", ()) in gauges


def test_worker_log_lines_carry_the_job_and_fal_request_ids_and_no_key(batch: list[Job], workers: Any) -> None:
    completed = batch[0]
    assert completed.fal is not None
    logs = workers.logs()
    assert f"job_id={completed.id} request_id={completed.fal.request_id}" in logs
    from tests.conftest import TEST_FAL_KEY

    assert TEST_FAL_KEY not in logs


def test_flower_api_lists_the_tasks_and_workers_only_with_its_password(
    flower: tuple[str, str], batch: list[Job]
) -> None:
    url, auth = flower
    user, password = auth.split(":", 1)
    assert httpx.get(f"{url}/api/workers", timeout=10).status_code == 401
    assert httpx.get(f"{url}/api/tasks", timeout=10).status_code == 401
    assert httpx.get(f"{url}/api/workers", auth=(user, "wrong"), timeout=10).status_code == 401
    workers = httpx.get(f"{url}/api/workers", params={"refresh": "1"}, auth=(user, password), timeout=30)
    assert workers.status_code == 200
    names = set(workers.json())
    assert any(name.startswith("transfer-") for name in names) and any(name.startswith("api-") for name in names)
    deadline = time.monotonic() + 20
    while True:
        tasks = httpx.get(f"{url}/api/tasks", auth=(user, password), timeout=10).json()
        seen = {(task["name"], task["state"]) for task in tasks.values()}
        # The submit runs in place after the stage (no task of its own); status checks: the poller.
        wanted = {(f"lipsync.{name}", "SUCCESS") for name in ("stage", "store")}
        if wanted <= seen or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert wanted <= seen
    # Prometheus scrapes Flower's throughput without the password.
    metrics = httpx.get(f"{url}/metrics", timeout=10)
    assert metrics.status_code == 200
    assert 'flower_events_total{task="lipsync.stage",type="task-succeeded"' in metrics.text
    assert "flower_task_runtime_seconds_bucket" in metrics.text


def test_stats_prints_throughput_latency_failures_and_spend(
    stack_env: dict[str, str], batch: list[Job], stats_before: dict[str, Any]
) -> None:
    result = lipsync(stack_env, "stats", "--minutes", "30", "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    # This batch's own: one completed, one failed (the window is 30 minutes, the batch seconds).
    assert stats["completed"] - stats_before["completed"] == 1
    assert stats["failed"] - stats_before["failed"] == 1
    assert stats["completed_per_minute"] > 0 and stats["spend_usd"] > 0
    end_to_end = stats["latency"]["end to end"]
    counted_before = stats_before.get("latency", {}).get("end to end", {}).get("count", 0)
    assert end_to_end["count"] > counted_before and 0 < end_to_end["percentiles"]["p50"] <= end_to_end["max"]
    assert "at fal" in stats["latency"] and "staging" in stats["latency"]
    assert any(failure["code"] == "invalid_input" for failure in stats["failures"])
    shown = lipsync(stack_env, "stats", "--minutes", "30")
    assert shown.returncode == 0, shown.stderr
    for words in ("throughput", "jobs/min", "estimated spend", "p50", "p99", "end to end", "invalid_input"):
        assert words in shown.stdout, words


def test_dev_up_runs_a_stack_for_work_by_hand_and_down_leaves_nothing(media: dict[str, str], tmp_path: Path) -> None:
    from producers.devenv import DevState, process_start_time

    home = tmp_path / "dev"
    up = lipsync({}, "dev", "up", "--dir", str(home), "--latency", "0.3", cwd=tmp_path, timeout=120)
    assert up.returncode == 0, up.stderr
    exported = dict(line.removeprefix("export ").split("=", 1) for line in up.stdout.splitlines())
    state = DevState.load(home)
    assert state is not None and exported == state.env
    try:
        again = lipsync({}, "dev", "up", "--dir", str(home), cwd=tmp_path)
        assert again.returncode == 0 and "already running" in again.stderr
        submitted = lipsync(
            exported, "submit", "--video", media["video_3s"], "--audio", media["audio_3s"], "--wait", "--json",
            "--timeout", "60", cwd=tmp_path,
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stderr
        assert json.loads(submitted.stdout)["status"] == "completed"
        assert lipsync({}, "dev", "status", "--dir", str(home), cwd=tmp_path).returncode == 0
    finally:
        down = lipsync({}, "dev", "down", "--dir", str(home), cwd=tmp_path)
    assert down.returncode == 0, down.stderr
    pids = {process.pid for process in state.processes}
    assert not [pid for pid in pids if process_start_time(pid)]
    assert not [pid for pid in group_members(pids) if process_start_time(pid)], "a child outlived its parent"
    ports = [int(exported["LIPSYNC_REDIS_URL"].rsplit(":", 1)[1].split("/")[0])]
    ports += [int(url.rsplit(":", 1)[1]) for url in (exported["LIPSYNC_S3_ENDPOINT_URL"], state.emulator_url or "")]
    ports += [int(url.split(":")[2].split("/")[0]) for url in state.metrics_urls]
    ports.append(int((state.flower_url or "").rsplit(":", 1)[1]))
    assert not [port for port in ports if port_open(port)]
    assert lipsync({}, "dev", "status", "--dir", str(home), cwd=tmp_path).returncode == 1


def group_members(groups: set[int]) -> list[int]:
    """Processes whose process group is one of `groups` (the stack's prefork children, say)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) in groups:
            members.append(int(stat.parent.name))
    return members
