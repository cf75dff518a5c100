"""The `lipsync` command line: submit and follow jobs, run workers, the emulator and the demo."""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from redis import RedisError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from lipsync.errors import LipsyncError
from lipsync.models import FalPriority, Job, JobStatus, Priority

console = Console(stderr=True, soft_wrap=True)  # an error is one line, whatever the width
out = Console()
F = TypeVar("F", bound=Callable[..., Any])
# Exit statuses: 0 all completed, 1 a job failed or was cancelled, 2 an error said in one line
# (bad input, a service down, misconfiguration), 3 gave up waiting (--timeout) with jobs still running.
EXIT_TIMED_OUT = 3
# `lipsync worker -Q api` serves its metrics here unless LIPSYNC_METRICS_PORT says otherwise, so it
# and a `-Q transfer` worker (the settings' 9808) can run side by side on one host.
DEFAULT_API_METRICS_PORT = 9809


def _client() -> Any:
    from producers.api import LipsyncClient

    return LipsyncClient()


def _fail(message: str) -> NoReturn:
    # Text, not markup: a value quoted in the message may hold brackets.
    console.print(Text.assemble(("error:", "red"), " ", message), highlight=False)
    sys.exit(2)


def friendly_errors(function: F) -> F:
    """Errors a person can act on, as one line and exit status 2 — never a traceback."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except LipsyncError as exc:
            _fail(exc.message)
        except (ConnectionError, OSError) as exc:
            _fail(f"cannot reach a service: {exc}")
        except RedisError as exc:  # not a builtin ConnectionError: redis-py has its own tree
            _fail(f"cannot reach Redis: {exc}")

    wrapper.__name__ = function.__name__
    wrapper.__doc__ = function.__doc__
    return wrapper  # type: ignore[return-value]


def _print_job(job: Job, as_json: bool) -> None:
    if as_json:
        out.print_json(json.dumps(job.public_dict()))
        return
    table = Table(show_header=False, box=None)
    table.add_row("job", job.id)
    table.add_row("status", _status_text(job.status))
    table.add_row("sync_mode", job.request.effective_sync_mode.value)
    if job.fal:
        table.add_row("fal request", job.fal.request_id)
        if job.fal.queue_position is not None and job.status is JobStatus.in_queue:
            table.add_row("queue position", str(job.fal.queue_position))
    if job.waiting_on and not job.terminal:
        table.add_row("waiting on", job.waiting_on)
    if job.cost_estimate_usd is not None:
        table.add_row("estimated cost", f"${job.cost_estimate_usd:.4f}")
    if job.output:
        table.add_row("output", job.output.url)
        table.add_row("duration", f"{job.output.duration:.3f} s" if job.output.duration else "?")
        if job.output.presigned_url:
            table.add_row("download", job.output.presigned_url)
    if job.error:
        table.add_row("error", f"{job.error.code}: {job.error.message}")
    for status, at in sorted(job.timestamps.items(), key=lambda item: item[1]):
        table.add_row(f"  {status}", time.strftime("%H:%M:%S", time.localtime(at)) + f".{int(at % 1 * 1000):03d}")
    out.print(table)


_COLOURS = {"completed": "green", "failed": "red", "cancelled": "yellow"}


def _status_text(status: JobStatus) -> str:
    colour = _COLOURS.get(status.value, "cyan")
    return f"[{colour}]{status.value}[/{colour}]"


class _Commands(click.Group):
    """The `lipsync` group: a bad setting (`LIPSYNC_*`), wherever a command meets it, is one line."""

    def invoke(self, ctx: click.Context) -> Any:
        from config.settings import ConfigError

        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            _fail(exc.message)


@click.group(cls=_Commands)
@click.version_option(package_name="lipsync-pipeline")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Lip-sync video at volume with fal-ai/sync-lipsync/v3."""
    if ctx.invoked_subcommand not in ("dev", "demo", "emulator"):
        from producers.devenv import adopt_running_stack

        if adopt_running_stack() is not None:
            console.print("[dim]using the local stack of `lipsync dev up` (.lipsync/dev)[/dim]", highlight=False)
    if ctx.invoked_subcommand not in ("dev", "emulator"):
        # Checked before the command does anything: a bad value is said before time or money is spent.
        from config.settings import get_settings

        get_settings()


@main.command()
@click.option("--video", required=True, help="https URL, s3://bucket/key, local file or data: URI")
@click.option("--audio", required=True, help="https URL, s3://bucket/key, local file or data: URI")
# Checked by the request model with everything else, so a wrong value is one line, like any other.
@click.option("--sync-mode", help="cut_off (default), loop, bounce, silence or remap")
@click.option("--options", "options_json", help='sync-3 options as JSON, e.g. \'{"model_mode": "lips"}\'')
@click.option("--idempotency-key", help="the same key returns the same job")
@click.option("--metadata", "metadata_json", help="your own ids as a JSON object, echoed back")
@click.option("--low-priority", is_flag=True, help="X-Fal-Queue-Priority: low (waits behind normal requests)")
@click.option(
    "--priority", type=click.Choice(["high", "normal", "low"]), default="normal", show_default=True,
    help="order in our admission to fal (strict); low also goes to fal as low",
)  # fmt: skip
@click.option("--tenant", help="whose job this is: free slots are shared fairly between tenants")
@click.option("--wait", is_flag=True, help="wait until the job ends")
@click.option("--timeout", type=float, default=None, help="with --wait: give up after this many seconds")
@click.option("--json", "as_json", is_flag=True, help="print the job record as JSON")
@friendly_errors
def submit(
    video: str,
    audio: str,
    sync_mode: str | None,
    options_json: str | None,
    idempotency_key: str | None,
    metadata_json: str | None,
    low_priority: bool,
    priority: str,
    tenant: str | None,
    wait: bool,
    timeout: float | None,
    as_json: bool,
) -> None:
    """Submit one (video, audio) pair."""
    options = _json_object("--options", options_json)
    metadata = _json_object("--metadata", metadata_json)
    client = _client()
    from producers.api import BrokerUnavailable

    try:
        job = client.submit(
            video,
            audio,
            sync_mode=sync_mode,
            options=options,
            idempotency_key=idempotency_key,
            metadata=_metadata(metadata),
            fal_priority=FalPriority.low if low_priority else None,
            priority=Priority(priority),
            tenant=tenant,
        )
    except BrokerUnavailable as exc:  # recorded: it runs when the broker is back; say so, once
        console.print(f"[yellow]warning:[/yellow] {exc.message}", highlight=False)
        job = exc.job
    if not wait:
        if as_json:
            _print_job(job, True)
        else:
            out.print(job.id)
        return
    (job,) = client.wait([job.id], timeout_s=timeout)
    _print_job(job, as_json)
    if not job.terminal:
        console.print(
            f"[yellow]timed out[/yellow] after {timeout or 0:g} s: job {job.id} is still {job.status.value}; "
            f"follow it with `lipsync wait {job.id}`",
            highlight=False,
        )
        sys.exit(EXIT_TIMED_OUT)
    sys.exit(0 if job.status is JobStatus.completed else 1)


def _metadata(metadata: dict[str, Any] | None) -> dict[str, str]:
    from producers.batch import metadata_strings

    try:
        return metadata_strings(metadata or {}, "--metadata")
    except ValueError as exc:
        raise LipsyncError(str(exc)) from None


def _json_object(flag: str, text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LipsyncError(f"{flag} is not valid JSON: {exc.msg} at position {exc.pos}") from None
    if not isinstance(value, dict):
        raise LipsyncError(f"{flag} must be a JSON object")
    return value


@main.command()
@click.argument("manifest", type=click.Path(path_type=Path))
@click.option("--no-wait", is_flag=True, help="submit and return")
@click.option("--timeout", type=float, default=None)
@click.option("--json", "as_json", is_flag=True, help="print the final job records as JSON lines")
@friendly_errors
def batch(manifest: Path, no_wait: bool, timeout: float | None, as_json: bool) -> None:
    """Submit every pair of a JSONL or CSV manifest, follow them, and summarise."""
    from producers.batch import submit_batch

    client = _client()
    submission = submit_batch(client, manifest)
    for error in submission.errors:
        console.print(f"[red]line {error.line}:[/red] {error.message}", highlight=False)
    console.print(f"batch {submission.batch_id}: {len(submission.jobs)} jobs submitted")
    if submission.broker_down is not None:
        console.print(
            f"[yellow]warning:[/yellow] the broker is unreachable: these jobs are recorded and start by themselves "
            f"once it is back; do not submit them again ({submission.broker_down.message.split(';')[0]})",
            highlight=False,
        )
    if no_wait or not submission.jobs:
        sys.exit(1 if submission.errors else 0)
    jobs = follow(client, [job.id for _, job in submission.jobs], timeout)
    if as_json:
        for job in jobs:
            out.print(json.dumps(job.public_dict()), soft_wrap=True)
    else:
        out.print(summary_table(jobs))
    ok = all(job.status is JobStatus.completed for job in jobs) and not submission.errors
    sys.exit(0 if ok else 1)


def follow(client: Any, job_ids: Sequence[str], timeout: float | None) -> list[Job]:
    """Wait with a live progress bar: done / total, and the count in each status."""
    with Progress(
        TextColumn("[bold]jobs"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("", total=len(job_ids))

        def update(statuses: dict[str, JobStatus | None]) -> None:
            counts: dict[str, int] = {}
            for status in statuses.values():
                name = status.value if status else "missing"
                counts[name] = counts.get(name, 0) + 1
            done = sum(n for s, n in counts.items() if s in ("completed", "failed", "cancelled"))
            progress.update(task, completed=done, description=" ".join(f"{s}:{n}" for s, n in sorted(counts.items())))

        jobs: list[Job] = client.wait(job_ids, timeout_s=timeout, on_progress=update)
    return jobs


def summary_table(jobs: Sequence[Job]) -> Table:
    table = Table(title="lipsync jobs")
    for column in ("job", "sync mode", "video s", "audio s", "output s", "status", "time s", "cost", "output / error"):
        table.add_column(column)
    for whole in table.columns:  # ids and statuses whole, also in a pipe (80 columns)
        if whole.header in ("job", "status"):
            whole.no_wrap, whole.min_width = True, 32 if whole.header == "job" else 9
    for job in jobs:
        video, audio = job.inputs.get("video"), job.inputs.get("audio")
        end = job.timestamps.get(job.status.value, job.updated_at)
        detail = job.output.url if job.output else (job.error.message if job.error else "")
        table.add_row(
            job.id,
            job.request.effective_sync_mode.value,
            f"{video.duration:.2f}" if video else "",
            f"{audio.duration:.2f}" if audio else "",
            f"{job.output.duration:.2f}" if job.output and job.output.duration else "",
            _status_text(job.status),
            f"{end - job.created_at:.1f}",
            f"${job.cost_estimate_usd:.3f}" if job.cost_estimate_usd is not None else "",
            detail,
        )
    priced = [job.cost_estimate_usd for job in jobs if job.cost_estimate_usd is not None]
    table.caption = f"estimated cost ${sum(priced):.2f} for {len(priced)} of {len(jobs)} jobs priced"
    return table


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def status(job_id: str, as_json: bool) -> None:
    """Show one job (a unique prefix of its id will do)."""
    client = _client()
    _print_job(client.get(client.resolve_id(job_id)), as_json)


@main.command()
@click.argument("job_ids", nargs=-1, required=True)
@click.option("--timeout", type=float, default=None)
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def wait(job_ids: tuple[str, ...], timeout: float | None, as_json: bool) -> None:
    """Wait for jobs to end; exit 0 only if all completed."""
    client = _client()
    job_ids = tuple(client.resolve_id(job_id) for job_id in job_ids)
    jobs = client.wait(list(job_ids), timeout_s=timeout) if as_json else follow(client, job_ids, timeout)
    if as_json:
        for job in jobs:
            out.print(json.dumps(job.public_dict()), soft_wrap=True)
    else:
        out.print(summary_table(jobs))
    running = [job.id for job in jobs if not job.terminal]
    if running:
        console.print(
            f"[yellow]timed out[/yellow] after {timeout or 0:g} s: {len(running)} job(s) still running", highlight=False
        )
        sys.exit(EXIT_TIMED_OUT)
    sys.exit(0 if all(job.status is JobStatus.completed for job in jobs) else 1)


@main.command()
@click.argument("job_id")
@friendly_errors
def cancel(job_id: str) -> None:
    """Cancel a job (and its fal request, if it has one)."""
    client = _client()
    job = client.cancel(client.resolve_id(job_id))
    out.print(f"{job.id} cancelled")


@main.command()
@click.argument("job_id")
@friendly_errors
def retry(job_id: str) -> None:
    """Start a failed or cancelled job over."""
    client = _client()
    job = client.retry(client.resolve_id(job_id))
    out.print(f"{job.id} queued again")


@main.command()
@click.option("--status", "status_name", type=click.Choice([s.value for s in JobStatus]))
@click.option("--batch", "batch_id")
@click.option("--limit", type=int, default=50)
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def jobs(status_name: str | None, batch_id: str | None, limit: int, as_json: bool) -> None:
    """List recent jobs."""
    client = _client()
    found = client.list(status=JobStatus(status_name) if status_name else None, batch_id=batch_id, limit=limit)
    if as_json:
        for job in found:
            out.print(json.dumps(job.public_dict()), soft_wrap=True)
        return
    out.print(summary_table(found))
    out.print(" ".join(f"{s}:{n}" for s, n in client.store.counts().items() if n))


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--queues", "-Q", default="transfer,api", show_default=True)
@click.option("--concurrency", "-c", type=int, default=None)
@click.option("--pool", "-P", default="threads", show_default=True, help="threads (I/O-bound steps) or prefork")
@click.option("--loglevel", "-l", default="INFO")
@click.pass_context
def worker(ctx: click.Context, queues: str, concurrency: int | None, pool: str | None, loglevel: str) -> None:
    """Start a Celery worker for these queues (extra arguments go to `celery worker`)."""
    from celery.bin.celery import celery as celery_command

    from config.settings import get_settings
    from lipsync.lifecycle import CELERY_APP

    names = {q.strip() for q in queues.split(",") if q.strip()}
    # Two workers started by hand on one host (-Q transfer, -Q api) must not both be celery@host
    # nor both want the metrics port: a node name per worker, a default metrics port per queue.
    if not any(arg in ("-n", "--hostname") or arg.startswith("--hostname=") for arg in ctx.args):
        ctx.args.extend(["--hostname", f"{'-'.join(sorted(names))}-{secrets.token_hex(3)}@%h"])
    if "LIPSYNC_METRICS_PORT" not in os.environ and names == {"api"}:
        os.environ["LIPSYNC_METRICS_PORT"] = str(DEFAULT_API_METRICS_PORT)
        get_settings.cache_clear()
    settings = get_settings()
    if pool is None:
        pool = "threads" if names == {"api"} else "prefork"
    if concurrency is None:
        concurrency = settings.api_concurrency if names == {"api"} else settings.transfer_concurrency
    celery_command.main(
        [
            "--app",
            CELERY_APP,
            "worker",
            "--queues",
            ",".join(sorted(names)),
            "--pool",
            pool,
            "--concurrency",
            str(concurrency),
            "--loglevel",
            loglevel,
            *ctx.args,
        ],
        prog_name="celery",
    )


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True}, add_help_option=False)
@click.pass_context
def emulator(ctx: click.Context) -> None:
    """Run the local fal queue emulator (`lipsync emulator --help` for its flags)."""
    from emulator.__main__ import main as emulator_main

    emulator_main(list(ctx.args))


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def flower(ctx: click.Context) -> None:
    """Run Flower for the workers, with basic auth (LIPSYNC_FLOWER_BASIC_AUTH=user:password)."""
    from celery.bin.celery import celery as celery_command

    from config.settings import get_settings
    from lipsync.lifecycle import CELERY_APP

    auth = get_settings().flower_basic_auth.get_secret_value()
    if not auth:
        raise click.UsageError("set LIPSYNC_FLOWER_BASIC_AUTH=user:password; Flower never runs open")
    celery_command.main(
        ["--app", CELERY_APP, "flower", f"--basic-auth={auth}", "--max-tasks=10000", *ctx.args], prog_name="celery"
    )


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--workers", type=int, default=1, show_default=True, help="gateway processes")
@click.option("--log-level", default="info", show_default=True)
def serve(host: str, port: int, workers: int, log_level: str) -> None:
    """Run the HTTP gateway: jobs and batches for tenants, fal webhooks in (docs/gateway.md)."""
    import uvicorn

    from config.logging import configure_logging
    from config.settings import get_settings

    configure_logging(get_settings())  # LIPSYNC_LOG_JSON: uvicorn's lines too, not its own format
    uvicorn.run(
        "producers.gateway:create_app",
        log_config=None,
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        proxy_headers=False,
    )


@main.group()
def tenants() -> None:
    """Manage the gateway's tenants and their API keys."""


@tenants.command("add")
@click.argument("name")
@friendly_errors
def tenants_add(name: str) -> None:
    """Create a tenant; prints its API key and callback secret, once."""
    credentials = _tenant_store().add(name)
    _print_credentials(credentials)


@tenants.command("rotate")
@click.argument("name")
@friendly_errors
def tenants_rotate(name: str) -> None:
    """Give a tenant a new API key; the old one stops working at once."""
    _print_credentials(_tenant_store().rotate(name))


@tenants.command("revoke")
@click.argument("name")
@friendly_errors
def tenants_revoke(name: str) -> None:
    """Revoke a tenant's API key (its jobs are kept; `rotate` issues a new key)."""
    _tenant_store().revoke(name)
    out.print(f"tenant {name}: key revoked")


@tenants.command("list")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def tenants_list(as_json: bool) -> None:
    """List tenants (never their keys or secrets)."""
    found = _tenant_store().all()
    if as_json:
        for tenant in found:
            record = {"name": tenant.name, "key_id": tenant.key_id, "created_at": tenant.created_at}
            out.print(json.dumps({**record, "revoked_at": tenant.revoked_at}), soft_wrap=True)
        return
    table = Table(title="tenants")
    for column in ("tenant", "key id", "created", "status"):
        table.add_column(column)
    for tenant in found:
        created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(tenant.created_at))
        table.add_row(tenant.name, tenant.key_id, created, "active" if tenant.active else "revoked")
    out.print(table)


def _tenant_store() -> Any:
    from config.settings import get_settings
    from lipsync.redis_client import connect
    from lipsync.tenants import TenantStore

    settings = get_settings()
    return TenantStore(connect(settings.redis_url), settings.key_prefix)


def _print_credentials(credentials: Any) -> None:
    out.print_json(
        json.dumps(
            {
                "tenant": credentials.tenant.name,
                "api_key": credentials.api_key.get_secret_value(),
                "callback_secret": credentials.tenant.callback_secret.get_secret_value(),
            }
        )
    )
    console.print("Keep these now: the API key is stored only as a hash and is never shown again.")


@main.command()
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("out"), show_default=True)
@click.option("--latency", default="1-3", show_default=True, help="emulator model latency, s")
@friendly_errors
def demo(out_dir: Path, latency: str) -> None:
    """Start a local stack, lip-sync a batch covering every sync mode, show the results, stop."""
    from producers.demo import run_demo

    sys.exit(run_demo(out_dir, latency))


@main.command()
@click.option("--minutes", type=float, default=15.0, show_default=True, help="the window: jobs that ended in it")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def stats(minutes: float, as_json: bool) -> None:
    """Throughput, latency percentiles, failures by cause and spend over the last N minutes."""
    from producers.stats import compute_stats, render_stats

    client = _client()
    summary = compute_stats(
        client.store, minutes, price_per_output_second_usd=client.settings.price_per_output_second_usd
    )
    if as_json:
        out.print_json(json.dumps(summary.as_dict()))
    else:
        out.print(render_stats(summary))


@main.group()
def dev() -> None:
    """Keep the local stack (Redis, S3, fal emulator, workers, Flower) running for work by hand."""


_DEV_DIR = click.option(
    "--dir", "home", type=click.Path(path_type=Path), default=Path(".lipsync") / "dev", show_default=True
)


@dev.command("up")
@_DEV_DIR
@click.option("--latency", default="1-3", show_default=True, help="emulator model latency, s")
def dev_up(home: Path, latency: str) -> None:
    """Start the stack in the background; prints `export` lines: eval "$(lipsync dev up)"."""
    from config.settings import Settings
    from producers.devenv import DevState, dead_processes, exports, up

    # The stack's workers inherit every other LIPSYNC_* variable: a bad one is said now, in one
    # line, not as workers that die in the background. Its own services replace these four.
    local = "redis://127.0.0.1:6379/0"
    Settings(redis_url=local, broker_url=local, fal_queue_url="http://127.0.0.1", s3_endpoint_url="")
    dead = dead_processes(home) if DevState.load(home) is not None else []
    state, started = up(home, latency)
    if dead:
        console.print(f"the local stack had lost {', '.join(dead)}: stopped the rest and started it anew")
    console.print("local stack " + ("started" if started else "already running") + f"; logs in {state.logdir}/")
    console.print(f"Flower: {state.flower_url}\nworker metrics: {' '.join(state.metrics_urls)}", highlight=False)
    console.print(
        "lipsync commands run from this folder use it by themselves (other tools: "
        'eval "$(lipsync dev env)"); stop it with `lipsync dev down`'
    )
    click.echo(exports(state.env))


@dev.command("env")
@_DEV_DIR
def dev_env(home: Path) -> None:
    """Print the running stack's environment as `export` lines."""
    from producers.devenv import DevState, exports

    state = DevState.load(home)
    if state is None or not state.running:
        raise click.ClickException("no local stack is running; start one with `lipsync dev up`")
    click.echo(exports(state.env))


@dev.command("status")
@_DEV_DIR
def dev_status(home: Path) -> None:
    """Show each process of the local stack; exit 1 unless all run."""
    from producers.devenv import DevState

    state = DevState.load(home)
    if state is None:
        console.print("no local stack (start one with `lipsync dev up`)")
        sys.exit(1)
    table = Table(title="local stack")
    for column in ("process", "pid", "state"):
        table.add_column(column)
    for process in state.processes:
        table.add_row(process.name, str(process.pid), "[green]running[/green]" if process.alive else "[red]gone[/red]")
    out.print(table)
    out.print(f"Flower: {state.flower_url}\nemulator: {state.emulator_url}", highlight=False)
    out.print(f"worker metrics: {' '.join(state.metrics_urls)}", highlight=False)
    sys.exit(0 if len(state.running) == len(state.processes) else 1)


@dev.command("down")
@_DEV_DIR
def dev_down(home: Path) -> None:
    """Stop every process `lipsync dev up` started."""
    from producers.devenv import down

    stopped = down(home)
    console.print(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")


if __name__ == "__main__":
    main()
