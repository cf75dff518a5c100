"""`python -m bench.merge OUT.json RUN.json [RUN.json ...]`: one `overhead` result from several
runs of it, their repetitions side by side and the spread taken again over all of them.

For a before/after measured by turns (before, after, before, after, ...) rather than one block
after the other: on a shared machine the load drifts over minutes, and alternating one
repetition at a time gives both sides the same drift. Merge each side, then `bench.compare`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from bench.measure import summarise
from bench.scenarios import OVERHEAD_KEYS


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = json.loads(json.dumps(results[0]))
    overhead = merged["scenarios"]["overhead"]
    overhead["runs"] = [run for result in results for run in result["scenarios"]["overhead"]["runs"]]
    for system in ("pipeline", "pipeline_webhooks"):
        overhead[system] = summarise([run[system] for run in overhead["runs"]], OVERHEAD_KEYS)
    merged["meta"]["scale_parameters"]["reps"] = len(overhead["runs"])
    merged["meta"]["merged_from"] = [result["meta"]["date"] for result in results]
    return merged


@click.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
def main(out: Path, runs: tuple[Path, ...]) -> None:
    out.write_text(json.dumps(merge([json.loads(path.read_text()) for path in runs]), indent=2) + "\n")
    click.echo(str(out))


if __name__ == "__main__":
    main()
