"""Results on disk: the full JSON, a Markdown summary that judges each target, and PNG plots."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SYSTEMS = {
    "pipeline": "this pipeline",
    "pipeline_webhooks": "this pipeline + fal webhooks",
    "subscribe_pool": "(a) fal-client subscribe pool",
    "blocking_celery": "(b) blocking Celery task",
}


def write(results: dict[str, Any], folder: Path, stem: str) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / f"{stem}.json", "md": folder / f"{stem}.md"}
    paths["json"].write_text(json.dumps(results, indent=1, default=_jsonable))
    plots = make_plots(results, folder, stem)
    paths["md"].write_text(markdown(results, {k: v.name for k, v in plots.items()}))
    return {**paths, **plots}


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def fmt(spread: Mapping[str, float] | None, unit: str = "", digits: int = 2) -> str:
    """`median (min–max)`: how every figure is reported."""
    if not spread or spread.get("runs", 0) == 0 or math.isnan(spread["median"]):
        return "n/a"
    median, low, high = (f"{spread[k]:.{digits}f}" for k in ("median", "min", "max"))
    if spread["runs"] == 1:
        return f"{median}{unit} (1 run)"
    return f"{median}{unit} ({low}–{high}, {spread['runs']} runs)"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**missed**")


def _median(spread: Mapping[str, float] | None) -> float | None:
    if not spread or spread.get("runs", 0) == 0:
        return None
    value = spread["median"]
    return None if math.isnan(value) else value


def targets(results: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    """(target, verdict, measured, comparison) for each target of the issue that was measured."""
    rows: list[tuple[str, str, str, str]] = []
    scenarios = results.get("scenarios", {})
    over = scenarios.get("overhead")
    if over:
        ours = over["pipeline"]
        ratio = _median(ours.get("makespan_over_limit"))
        hooked = over.get("pipeline_webhooks") or {}
        rows.append((
            f"makespan / limit ≤ 1.10 at {over['jobs']} jobs (L = {over['latency_s']:g} s)",
            verdict(None if ratio is None else ratio <= 1.10),
            f"{fmt(ours.get('makespan_over_limit'))}; makespan {fmt(ours.get('makespan_s'), ' s', 1)}, "
            f"limit L + bytes {fmt(ours.get('limit_s'), ' s', 1)}; "
            f"makespan / L {fmt(ours.get('makespan_over_latency'))}. With webhooks: "
            f"{fmt(hooked.get('makespan_over_limit'))}",
            _ratio_text(over, "makespan_s"),
        ))  # fmt: skip
        p95 = _median(ours.get("overhead_p95_s"))
        rows.append((
            "p95 overhead per job ≤ 2 s",
            verdict(None if p95 is None else p95 <= 2.0),
            f"p50 {fmt(ours.get('overhead_p50_s'), ' s')}, p95 {fmt(ours.get('overhead_p95_s'), ' s')}, "
            f"p99 {fmt(ours.get('overhead_p99_s'), ' s')}. "
            f"With webhooks: p95 {fmt(hooked.get('overhead_p95_s'), ' s')}",
            _ratio_text(over, "overhead_p95_s"),
        ))  # fmt: skip
        cpu = _median(ours.get("orchestration_cpu_ms_per_job"))
        rows.append((
            "≤ 10 ms orchestration CPU per job (worker CPU but moving and probing media bytes)",
            verdict(None if cpu is None else cpu <= 10.0),
            f"{fmt(ours.get('orchestration_cpu_ms_per_job'), ' ms', 1)} of "
            f"{fmt(ours.get('worker_cpu_ms_per_job'), ' ms', 1)} all worker processes (media work "
            f"{fmt(ours.get('media_cpu_ms_per_job'), ' ms', 1)}); with webhooks (gateway included) "
            f"{fmt(hooked.get('orchestration_cpu_ms_per_job'), ' ms', 1)} of "
            f"{fmt(hooked.get('worker_cpu_ms_per_job'), ' ms', 1)}",
            _ratio_text(over, "worker_cpu_ms_per_job"),
        ))  # fmt: skip
        if "ratios" in over:
            wins = all(
                (_median(over["ratios"].get(f"{m}:{b}")) or 0) > 1
                for m in ("makespan_s", "worker_cpu_ms_per_job")
                for b in ("subscribe_pool", "blocking_celery")
            )
            rows.append((
                "ahead of both baselines on makespan and CPU per job",
                verdict(wins),
                "ratios baseline / pipeline, same repetition: "
                + ", ".join(
                    f"{m.split('_')[0]} vs {b.split('_')[0]} {fmt(over['ratios'].get(f'{m}:{b}'), '×')}"
                    for m in ("makespan_s", "worker_cpu_ms_per_job")
                    for b in ("subscribe_pool", "blocking_celery")
                ),
                "",
            ))  # fmt: skip
    flight = scenarios.get("inflight")
    if flight:
        ours = flight["pipeline"]
        peak = max(_median(ours.get("peak_at_fal")) or 0, _median(ours.get("waiting_at_fal")) or 0)
        pss = _median(ours.get("peak_worker_pss_mb"))
        rows.append((
            f"≥ 5,000 jobs in flight on one 2-core host ({flight['jobs']} jobs, L = {flight['latency_s']:g} s)",
            verdict(None if peak is None else peak >= 5000),
            f"waiting at fal at once {fmt(ours.get('waiting_at_fal'), '', 0)}; worker CPU meanwhile: api "
            f"{fmt(ours.get('api_cpu_while_waiting'))} cores, transfer {fmt(ours.get('transfer_cpu_while_waiting'))}",
            "",
        ))  # fmt: skip
        rows.append((
            "worker memory ≤ 300 MB with them in flight",
            verdict(None if pss is None else pss <= 300),
            f"peak PSS over the run {fmt(ours.get('peak_worker_pss_mb'), ' MB', 0)} (RSS sum, shared pages counted "
            "per process: "
            f"{fmt(ours.get('peak_worker_rss_mb'), ' MB', 0)})",
            "",
        ))  # fmt: skip
    big = scenarios.get("bigmedia")
    if big:
        measured = {size: found for size, found in big["sizes"].items() if "runs" in found}
        if measured:
            worst_stage = min(_median(f.get("stage_vs_raw")) or 0 for f in measured.values())
            worst_store = min(_median(f.get("store_vs_raw")) or 0 for f in measured.values())
            rows.append((
                "staging and storing ≥ 90% of raw boto3 throughput",
                verdict(worst_stage >= 0.9 and worst_store >= 0.9),
                "; ".join(
                    f"{size} MB: stage {fmt(f.get('stage_vs_raw'))}, store {fmt(f.get('store_vs_raw'))} of raw"
                    for size, f in measured.items()
                ),
                "",
            ))  # fmt: skip
            peaks = [_median(f.get("peak_process_rss_mb")) or 0 for f in measured.values()]
            flat = max(peaks) <= 1.25 * min(peaks) + 20 if peaks else None
            rows.append((
                "peak worker RSS independent of file size",
                verdict(flat),
                "; ".join(f"{size} MB: {fmt(f.get('peak_process_rss_mb'), ' MB', 0)}" for size, f in measured.items()),
                "",
            ))  # fmt: skip
    return rows


def _ratio_text(over: Mapping[str, Any], metric: str) -> str:
    ratios = over.get("ratios")
    if not ratios:
        return ""
    return "; ".join(
        f"{SYSTEMS[b]} {fmt(ratios.get(f'{metric}:{b}'), '×')} (with webhooks "
        f"{fmt(ratios.get(f'{metric}:{b}:webhooks'), '×')})"
        for b in ("subscribe_pool", "blocking_celery")
    )


def markdown(results: Mapping[str, Any], plots: Mapping[str, str]) -> str:
    meta = results["meta"]
    lines = [
        f"# Benchmark results — {meta['date']} ({meta['scale']} scale)",
        "",
        f"Machine: {meta['cpus']} CPUs, {meta['memory_gb']:.0f} GB RAM, {meta['python']}; "
        f"run took {meta.get('duration_s', 0) / 60:.1f} min. {meta.get('note', '')}",
        "",
        "Each figure: median (min–max, runs) over repeated runs. Ratios are baseline ÷ pipeline within "
        "one repetition (> 1 means the pipeline is ahead), then the median over repetitions.",
        "",
        "## Targets",
        "",
        "| target | verdict | measured | vs baselines (baseline ÷ pipeline) |",
        "|---|---|---|---|",
    ]
    for row in targets(results):
        lines.append("| " + " | ".join(row) + " |")
    scenarios = results.get("scenarios", {})
    if "overhead" in scenarios:
        lines += _overhead_section(scenarios["overhead"], plots)
    if "inflight" in scenarios:
        lines += _inflight_section(scenarios["inflight"], plots)
    if "ceiling" in scenarios:
        lines += _ceiling_section(scenarios["ceiling"], plots)
    if "bigmedia" in scenarios:
        lines += _big_section(scenarios["bigmedia"], plots)
    return "\n".join(lines) + "\n"


def _overhead_section(over: Mapping[str, Any], plots: Mapping[str, str]) -> list[str]:
    lines = [
        "",
        f"## Overhead and baselines: {over['jobs']} tiny jobs, L = {over['latency_s']:g} s, no concurrency limit",
        "",
        f"Baselines get {over['baseline_width']} threads each (jobs in flight at once); the pipeline runs "
        "its shipped workers (transfer: threads × 16, api: threads × 8 with the poller). "
        '"+ fal webhooks": the same workers with '
        "`lipsync serve` receiving fal's signed webhooks (its CPU counted with the workers'), and polling "
        "relaxed to a safety net (`LIPSYNC_POLL_INITIAL_S=10`, `LIPSYNC_POLL_MAX_S=120`).",
        "",
        "| | makespan | p50 / p95 overhead | worker CPU per job | worker memory (PSS) | Redis commands per job "
        "| status polls per job |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, label in SYSTEMS.items():
        if key not in over:
            continue
        found = over[key]
        polls = found.get("polls_per_job") or found.get("status_polls_per_job")
        lines.append(
            f"| {label} | {fmt(found.get('makespan_s'), ' s', 1)} | {fmt(found.get('overhead_p50_s'), ' s')} / "
            f"{fmt(found.get('overhead_p95_s'), ' s')} | {fmt(found.get('worker_cpu_ms_per_job'), ' ms', 1)} | "
            f"{fmt(found.get('peak_worker_pss_mb'), ' MB', 0)} | {fmt(found.get('redis_commands_per_job'), '', 0)} | "
            f"{fmt(polls, '', 1)} |"
        )
    ours = over["pipeline"]
    lines += [
        "",
        f"Limit = L + the bytes' own transfer time, {fmt(ours.get('bytes_s'), ' s', 1)}: plain boto3 with 8 threads "
        "moving what the jobs move through S3 on this machine (both inputs read twice — staging, then fal — and "
        "the output written once).",
    ]
    first = over["runs"][0]["pipeline"]
    if first.get("phases_s"):
        lines += ["", "Where a job's time went (first repetition, seconds, p50 / p95):", "",
                  "| waiting for a transfer slot | stage | submit | at fal beyond L | store (queue included) |",
                  "|---|---|---|---|---|"]  # fmt: skip
        phases = first["phases_s"]
        names = ("waiting_for_stage", "stage", "submit", "at_fal_beyond_L", "store")
        lines.append(
            "| " + " | ".join(
                f"{phases[n]['p50']:.2f} / {phases[n]['p95']:.2f}" if n in phases else "n/a" for n in names
            ) + " |"
        )  # fmt: skip
    if first.get("redis_commands_top"):
        top = ", ".join(f"{k} {v}" for k, v in list(first["redis_commands_top"].items())[:10])
        lines += ["", f"Redis commands per job, first repetition (Lua-internal calls included): {top}."]
    if "overhead" in plots:
        lines += ["", f"![overhead]({plots['overhead']})"]
    return lines


def _inflight_section(flight: Mapping[str, Any], plots: Mapping[str, str]) -> list[str]:
    ours = flight["pipeline"]
    lines = [
        "",
        f"## In flight: {flight['jobs']} jobs, L = {flight['latency_s']:g} s, one worker host",
        "",
        "fal (the emulator) holds every request in its queue until the whole batch is staged and submitted, "
        f"keeps them all waiting {flight.get('hold_s', 0):g} s more — the plateau, over which the workers' CPU "
        "and memory are measured — then runs them all at once for L seconds.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| requests waiting at fal at once (plateau) | {fmt(ours.get('waiting_at_fal'), '', 0)} |",
        f"| peak waiting at fal (sampled every second) | {fmt(ours.get('peak_at_fal'), '', 0)} |",
        f"| time until all were waiting at fal | {fmt(ours.get('all_waiting_after_s'), ' s', 0)} |",
        f"| producer submit time for all jobs | {fmt(ours.get('submit_s'), ' s', 1)} |",
        f"| staging rate (jobs handed to fal per second) | {fmt(ours.get('stage_rate_per_s'), '/s', 1)} |",
        f"| api worker CPU on the plateau (cores) | {fmt(ours.get('api_cpu_while_waiting'))} |",
        f"| transfer worker CPU on the plateau (cores) | {fmt(ours.get('transfer_cpu_while_waiting'))} |",
        f"| status polls per second on the plateau | {fmt(ours.get('polls_per_s_while_waiting'), '', 1)} |",
        f"| worker memory on the plateau, PSS | {fmt(ours.get('pss_while_waiting_mb'), ' MB', 0)} |",
        f"| peak worker memory over the run, PSS (RSS sum) | {fmt(ours.get('peak_worker_pss_mb'), ' MB', 0)} "
        f"({fmt(ours.get('peak_worker_rss_mb'), ' MB', 0)}) |",
        f"| worker CPU per job, whole run | {fmt(ours.get('worker_cpu_ms_per_job'), ' ms', 1)} |",
        f"| status polls per job | {fmt(ours.get('polls_per_job'), '', 1)} |",
        f"| makespan | {fmt(ours.get('makespan_s'), ' s', 0)} |",
    ]
    if "inflight" in plots:
        lines += ["", f"![in flight]({plots['inflight']})"]
    return lines


def _ceiling_section(ceiling: Mapping[str, Any], plots: Mapping[str, str]) -> list[str]:
    ours = ceiling["pipeline"]
    lines = [
        "",
        f"## Throughput ceiling: {ceiling['jobs']} jobs, L = 0",
        "",
        f"End-to-end throughput {fmt(ours.get('jobs_per_s'), ' jobs/s', 1)}; "
        f"makespan {fmt(ours.get('makespan_s'), ' s', 1)}; "
        f"worker CPU {fmt(ours.get('worker_cpu_ms_per_job'), ' ms/job', 1)}.",
        "",
        "CPU per job by process (ms, median over runs): "
        + ", ".join(
            f"{name} {_median(value) or 0:.1f}"
            for name, value in sorted(
                ceiling["cpu_ms_per_job_by_process"].items(), key=lambda kv: -(_median(kv[1]) or 0)
            )
        ),
    ]
    profile = ceiling.get("profile") or {}
    for worker in ("transfer", "api"):
        found = profile.get(worker)
        if found and "share" in found:
            top = ", ".join(f"{k} {v:.0%}" for k, v in list(found["share"].items())[:8])
            lines += ["", f"py-spy, {worker} worker ({found['samples']} samples): {top}."]
    if "ceiling" in plots:
        lines += ["", f"![ceiling]({plots['ceiling']})"]
    return lines


def _big_section(big: Mapping[str, Any], plots: Mapping[str, str]) -> list[str]:
    lines = [
        "",
        "## Big media: one job each, staged and stored, against raw boto3 of the same bytes",
        "",
        "| video | raw boto3 upload_file + download_file | stage | store | stage / raw | store / raw "
        "| peak transfer process RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    for size, found in big["sizes"].items():
        if "runs" not in found:
            lines.append(f"| {size} MB | skipped: {found.get('skipped')} | | | | | |")
            continue
        lines.append(
            f"| {found['video_bytes'] / 2**20:.0f} MB | {fmt(found.get('raw_mb_per_s'), ' MB/s', 0)} | "
            f"{fmt(found.get('stage_mb_per_s'), ' MB/s', 0)} | {fmt(found.get('store_mb_per_s'), ' MB/s', 0)} | "
            f"{fmt(found.get('stage_vs_raw'))} | {fmt(found.get('store_vs_raw'))} | "
            f"{fmt(found.get('peak_process_rss_mb'), ' MB', 0)} |"
        )
    lines += [
        "",
        "Raw MB/s = bytes ÷ (upload_file time + download_file time): a stage moves the bytes down from S3 and "
        "up again, and so does a store (down from fal's CDN, up to S3).",
    ]
    if "bigmedia" in plots:
        lines += ["", f"![big media]({plots['bigmedia']})"]
    return lines


# plots ---------------------------------------------------------------------------------------------
def _bars(axis: Any, labels: list[str], spreads: list[Mapping[str, float] | None], title: str, unit: str) -> None:
    medians = [(_median(s) or 0.0) for s in spreads]
    lows = [m - (s or {}).get("min", m) for m, s in zip(medians, spreads, strict=True)]
    highs = [(s or {}).get("max", m) - m for m, s in zip(medians, spreads, strict=True)]
    colors = ["#2b7bba", "#5aa0d8", "#c8553d", "#8e6c8a"]
    axis.bar(labels, medians, yerr=[lows, highs], capsize=4, color=colors[: len(labels)])
    axis.set_title(title)
    axis.set_ylabel(unit)
    axis.tick_params(axis="x", labelrotation=15)


def make_plots(results: Mapping[str, Any], folder: Path, stem: str) -> dict[str, Path]:
    scenarios = results.get("scenarios", {})
    paths: dict[str, Path] = {}
    over = scenarios.get("overhead")
    if over:
        keys = [k for k in SYSTEMS if k in over]
        short = {"pipeline": "pipeline", "pipeline_webhooks": "pipeline+webhooks"}
        labels = [short.get(k, SYSTEMS[k].split(" ", 1)[-1]) for k in keys]
        figure, axes = plt.subplots(1, 3, figsize=(14, 4.2))
        _bars(axes[0], labels, [over[k].get("makespan_s") for k in keys], f"makespan, {over['jobs']} jobs", "s")
        limit = _median(over["pipeline"].get("limit_s"))
        if limit:
            axes[0].axhline(limit, color="black", linestyle="--", label="limit (L + bytes)")
            axes[0].legend()
        _bars(axes[1], labels, [over[k].get("worker_cpu_ms_per_job") for k in keys], "worker CPU per job", "ms")
        _bars(axes[2], labels, [over[k].get("overhead_p95_s") for k in keys], "p95 overhead per job", "s")
        figure.tight_layout()
        paths["overhead"] = _save(figure, folder / f"{stem}-overhead.png")
    flight = scenarios.get("inflight")
    if flight and flight["runs"]:
        series = flight["runs"][0]["series"]
        figure, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
        axes[0].plot(*zip(*series["at_fal"], strict=True), color="#2b7bba") if series["at_fal"] else None
        axes[0].set_ylabel("waiting at fal")
        axes[0].set_title(f"{flight['jobs']} jobs, L = {flight['latency_s']:g} s (first run)")
        for name, color in (("transfer", "#c8553d"), ("api", "#2b7bba")):
            if series.get(f"{name}_pss_mb"):
                axes[1].plot(*zip(*series[f"{name}_pss_mb"], strict=True), label=name, color=color)
            if series.get(f"{name}_cpu"):
                axes[2].plot(*zip(*series[f"{name}_cpu"], strict=True), label=name, color=color)
        axes[1].set_ylabel("worker PSS, MB")
        axes[1].legend()
        axes[2].set_ylabel("worker CPU, cores")
        axes[2].set_xlabel("seconds since the first submit")
        axes[2].legend()
        figure.tight_layout()
        paths["inflight"] = _save(figure, folder / f"{stem}-inflight.png")
    ceiling = scenarios.get("ceiling")
    if ceiling:
        figure, axes = plt.subplots(1, 2, figsize=(13, 4.5))
        by_process = {k: _median(v) or 0.0 for k, v in ceiling["cpu_ms_per_job_by_process"].items()}
        names = sorted(by_process, key=lambda k: -by_process[k])
        axes[0].barh(names, [by_process[n] for n in names], color="#2b7bba")
        axes[0].invert_yaxis()
        axes[0].set_xlabel("CPU ms per job")
        axes[0].set_title("where the machine's CPU goes, L = 0")
        profile = ceiling.get("profile") or {}
        rows = []
        for worker in ("transfer", "api"):
            for component, share in (profile.get(worker) or {}).get("share", {}).items():
                rows.append((f"{worker}: {component}", share))
        rows = sorted(rows, key=lambda r: -r[1])[:14]
        if rows:
            axes[1].barh([r[0] for r in rows], [r[1] * 100 for r in rows], color="#c8553d")
            axes[1].invert_yaxis()
            axes[1].set_xlabel("% of the worker's samples (py-spy)")
            axes[1].set_title("inside the workers")
        figure.tight_layout()
        paths["ceiling"] = _save(figure, folder / f"{stem}-ceiling.png")
    big = scenarios.get("bigmedia")
    if big:
        measured = {s: f for s, f in big["sizes"].items() if "runs" in f}
        if measured:
            figure, axes = plt.subplots(1, 2, figsize=(12, 4.2))
            sizes = list(measured)
            for key, label, color in (
                ("raw_mb_per_s", "raw boto3", "black"),
                ("stage_mb_per_s", "stage", "#2b7bba"),
                ("store_mb_per_s", "store", "#c8553d"),
            ):
                axes[0].plot(sizes, [_median(measured[s].get(key)) or 0 for s in sizes], "o-", label=label, color=color)
            axes[0].set_xlabel("video size, MB")
            axes[0].set_ylabel("MB/s")
            axes[0].set_title("throughput")
            axes[0].legend()
            axes[1].plot(sizes, [_median(measured[s].get("peak_process_rss_mb")) or 0 for s in sizes], "o-")
            axes[1].set_ylim(bottom=0)
            axes[1].set_xlabel("video size, MB")
            axes[1].set_ylabel("MB")
            axes[1].set_title("peak RSS of the transfer worker process")
            figure.tight_layout()
            paths["bigmedia"] = _save(figure, folder / f"{stem}-bigmedia.png")
    return paths


def _save(figure: Any, path: Path) -> Path:
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
