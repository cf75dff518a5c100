"""`python -m bench [scenarios...] [--scale smoke|small|full]`: start a stack, run, write results."""

from __future__ import annotations

import dataclasses
import datetime
import json
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import click
import psutil

from bench import report, scenarios
from bench.stack import BenchStack

ALL = ("overhead", "inflight", "ceiling", "bigmedia")
HERE = Path(__file__).resolve().parent


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("names", nargs=-1, type=click.Choice(ALL))
@click.option("--scale", type=click.Choice(sorted(scenarios.SCALES)), default="small", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=HERE / "results", show_default=True)
@click.option("--stem", default=None, help="file name of the results, without suffix [default: today's date]")
@click.option("--no-baselines", is_flag=True, help="overhead without the two baselines")
@click.option("--no-profile", is_flag=True, help="ceiling without the py-spy run")
@click.option("--note", default="", help="a sentence for the summary (e.g. what else ran on the machine)")
@click.option("--keep-tmp", is_flag=True, help="keep worker logs, profiles and media under <out>/tmp")
@click.option("--reps", type=click.IntRange(min=1), default=None, help="repetitions instead of the scale's")
def main(
    names: tuple[str, ...],
    scale: str,
    out: Path,
    stem: str | None,
    no_baselines: bool,
    no_profile: bool,
    note: str,
    keep_tmp: bool,
    reps: int | None,
) -> None:
    """Run the benchmark scenarios (all of them by default) on a local stack of their own."""
    chosen = names or ALL
    size = scenarios.SCALES[scale]
    if reps is not None:
        size = dataclasses.replace(size, reps=reps)
    stem = stem or datetime.date.today().isoformat() + ("" if scale == "full" else f"-{scale}")
    workdir = out / "tmp" / stem
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    started = time.time()

    def log(message: str) -> None:
        click.echo(f"[{time.strftime('%H:%M:%S')}] {message}", err=True)

    results: dict[str, Any] = {
        "meta": {
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "scale": scale,
            "scale_parameters": size.__dict__,
            "cpus": psutil.cpu_count(),
            "memory_gb": psutil.virtual_memory().total / 2**30,
            "python": f"Python {platform.python_version()} on {platform.system()}",
            "note": note,
            "scenarios": list(chosen),
        },
        "scenarios": {},
    }
    stack = BenchStack(workdir)
    try:
        log(f"starting the stack in {workdir}")
        stack.start()
        for name in chosen:
            log(f"scenario {name} ({scale})")
            if name == "overhead":
                found = scenarios.overhead(stack, size, log, baselines=not no_baselines)
            elif name == "ceiling":
                found = scenarios.ceiling(stack, size, log, profile=not no_profile)
            elif name == "inflight":
                found = scenarios.inflight(stack, size, log)
            else:
                found = scenarios.bigmedia(stack, size, log)
            results["scenarios"][name] = found
            # Written after every scenario: a long run that breaks later keeps what it measured.
            results["meta"]["duration_s"] = time.time() - started
            paths = report.write(results, out, stem)
    finally:
        stack.stop()
        if not keep_tmp:
            shutil.rmtree(workdir, ignore_errors=True)
    log("wrote " + ", ".join(str(p) for p in paths.values()))
    click.echo(json.dumps({k: str(v) for k, v in paths.items()}))


if __name__ == "__main__":
    main()
