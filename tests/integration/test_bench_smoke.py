"""The benchmark runner, at a size that takes seconds, so it cannot rot: it starts its own
stack, runs the pipeline and both baselines on a few jobs and a small big-media job, and
writes its JSON, Markdown and plots. Timings are not asserted here (see bench/README.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(240)
def test_bench_runner_runs_every_system_and_writes_its_results(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "overhead", "bigmedia", "--scale", "smoke", "--out", str(tmp_path),
         "--stem", "smoke"],
        cwd=REPO,
        env={key: value for key, value in os.environ.items() if not key.startswith(("LIPSYNC_", "FAL_", "AWS_"))},
        capture_output=True,
        text=True,
        timeout=220,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "smoke.json").read_text())
    overhead = results["scenarios"]["overhead"]
    for run in overhead["runs"]:
        for system in ("pipeline", "subscribe_pool", "blocking_celery"):
            assert run[system]["completed"] == run[system]["jobs"] == overhead["jobs"], (system, run[system]["errors"])
        assert run["pipeline"]["worker_cpu_s"] > 0 and run["pipeline"]["redis_commands_per_job"] > 0
        # The workers' own count of media CPU was read: the worker CPU splits into both parts.
        media, orchestration = run["pipeline"]["media_cpu_ms_per_job"], run["pipeline"]["orchestration_cpu_ms_per_job"]
        assert media > 0 and orchestration > 0
        assert media + orchestration == pytest.approx(run["pipeline"]["worker_cpu_ms_per_job"])
    (size,) = results["scenarios"]["bigmedia"]["sizes"].values()
    assert size["runs"][0]["output_bytes"] > 0 and size["runs"][0]["peak_process_rss_mb"] > 0
    summary = (tmp_path / "smoke.md").read_text()
    assert "## Targets" in summary and "makespan / limit" in summary
    assert (tmp_path / "smoke-overhead.png").stat().st_size > 0
    assert not (tmp_path / "tmp" / "smoke").exists(), "the runner leaves no temporary files behind"
