"""`python -m bench.compare BEFORE.json AFTER.json --out bench/results/STEM`: two runs of the
`overhead` scenario (the code before a change and after it, run back to back on one machine)
side by side, with the ratio before ÷ after of each figure (above 1: the change is ahead)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

# The figures; the names are the bench JSON's own.
FIGURES = (
    ("redis_commands_per_job", "Redis commands / job", "{:.0f}", 100.0),
    ("worker_cpu_ms_per_job", "worker CPU ms / job", "{:.1f}", 25.0),
    ("overhead_p95_s", "p95 overhead s", "{:.2f}", 2.5),
    ("makespan_over_limit", "makespan / limit", "{:.2f}", 1.3),
    ("overhead_p50_s", "p50 overhead s", "{:.2f}", None),
    ("polls_per_job", "status checks / job", "{:.2f}", None),
    ("redis_scripts_per_job", "Lua scripts / job", "{:.1f}", None),
    ("peak_worker_pss_mb", "peak worker PSS MB", "{:.0f}", None),
)

# The worker CPU split in two, where a side measured it (the bench reads it since 2026-11-26).
_SPLIT = (
    ("orchestration_cpu_ms_per_job", "orchestration CPU ms / job", "{:.1f}", None),
    ("media_cpu_ms_per_job", "media CPU ms / job (moving and probing bytes)", "{:.1f}", None),
)


def figures(result: dict[str, Any], system: str) -> dict[str, Any]:
    overhead = result["scenarios"]["overhead"]
    summary = {name: overhead[system][name] for name, *_ in FIGURES + _SPLIT if name in overhead[system]}
    runs = [run[system] for run in overhead["runs"]]
    processes = sorted({name for run in runs for name in run["cpu_ms_per_job"]})
    summary["cpu_ms_per_job"] = {
        name: sorted(run["cpu_ms_per_job"].get(name, 0.0) for run in runs)[len(runs) // 2] for name in processes
    }
    return summary


def compare(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"before": {}, "after": {}, "ratios": {}}
    for system in ("pipeline", "pipeline_webhooks"):
        old, new = figures(before, system), figures(after, system)
        out["before"][system], out["after"][system] = old, new
        out["ratios"][system] = {
            name: old[name]["median"] / max(1e-9, new[name]["median"])
            for name, *_ in FIGURES
            if name in old and name in new
        }
    return out


def markdown(table: dict[str, Any], before: dict[str, Any], after: dict[str, Any], note: str) -> str:
    meta = after["meta"]
    lines = [
        "# Engine rework (issue 11): before and after, one machine, back to back",
        "",
        f"{meta['date']}, scale `{meta['scale']}` ({meta['scale_parameters']['overhead_jobs']} jobs, "
        f"L = {meta['scale_parameters']['overhead_latency']} s, {meta['scale_parameters']['reps']} repetitions each), "
        f"{meta['cpus']} CPUs. {before['meta'].get('note') or 'before: the previous commit'}; "
        f"{meta.get('note') or 'after: this branch'}. Figures are medians (min–max) over the repetitions; "
        "ratio = before ÷ after (above 1: after is ahead on a figure where lower is better).",
        "",
    ]
    if note:
        lines += [note, ""]
    for system, title in (("pipeline", "Polling"), ("pipeline_webhooks", "With fal webhooks")):
        lines += [f"## {title}", "", "| figure | target | before | after | ratio |", "|---|---|---|---|---|"]
        for name, label, fmt, target in FIGURES:
            old = table["before"][system].get(name)
            new = table["after"][system].get(name)
            if old is None or new is None:
                continue

            def cell(value: dict[str, Any], fmt: str = fmt) -> str:
                return f"{fmt.format(value['median'])} ({fmt.format(value['min'])}–{fmt.format(value['max'])})"

            goal = "" if target is None or system != "pipeline" else f"≤ {target:g}"
            ratio = "–" if new["median"] == 0 else f"{table['ratios'][system][name]:.2f}"
            lines.append(f"| {label} | {goal} | {cell(old)} | {cell(new)} | {ratio} |")
        old_cpu, new_cpu = table["before"][system]["cpu_ms_per_job"], table["after"][system]["cpu_ms_per_job"]
        names = sorted(set(old_cpu) | set(new_cpu))
        by_process = ", ".join(f"{n} {old_cpu.get(n, 0):.1f} → {new_cpu.get(n, 0):.1f}" for n in names)
        lines += ["", f"CPU ms per job by process (median run): {by_process}"]
        for name, label, fmt, _ in _SPLIT:
            for side in ("before", "after"):
                found = table[side][system].get(name)
                if found and found.get("runs"):
                    lines.append(
                        f"- {label}, {side}: {fmt.format(found['median'])} "
                        f"({fmt.format(found['min'])}–{fmt.format(found['max'])})"
                    )
        lines += [""]
    return "\n".join(lines) + "\n"


@click.command()
@click.argument("before", type=click.Path(exists=True, path_type=Path))
@click.argument("after", type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="path without suffix")
@click.option("--note", default="", help="a paragraph for the summary")
def main(before: Path, after: Path, out: Path, note: str) -> None:
    """Write OUT.json (both runs' figures and the ratios) and OUT.md (the table)."""
    old, new = json.loads(before.read_text()), json.loads(after.read_text())
    table = compare(old, new)
    table["meta"] = {"before": old["meta"], "after": new["meta"], "note": note}
    out.with_suffix(".json").write_text(json.dumps(table, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(table, old, new, note))
    click.echo(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
