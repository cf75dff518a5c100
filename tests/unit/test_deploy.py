"""The production files check out without a Docker engine: docker-compose.yml against the compose
spec (schema vendored under deploy/schemas), every service's command as a real `lipsync` entry
point, and the Prometheus/Grafana files pointing at metrics the workers really export."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "lipsync-pipeline:latest"


def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return document


def our_services() -> dict[str, dict[str, Any]]:
    return {name: service for name, service in compose()["services"].items() if service.get("image") == IMAGE}


def lipsync_executable() -> str:
    # The console script the image's ENTRYPOINT runs, installed beside this interpreter.
    return str(Path(sys.executable).parent / "lipsync")


def test_compose_file_matches_the_compose_spec() -> None:
    schema = json.loads((ROOT / "deploy/schemas/compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{error.json_path}: {error.message}" for error in validator.iter_errors(compose())]
    assert errors == []


def test_compose_runs_the_whole_stack_the_design_asks_for() -> None:
    services = compose()["services"]
    assert {"redis", "minio", "minio-init", "worker-transfer", "worker-api", "flower", "gateway"} <= set(services)
    # Each option read with its value: "--appendonly no" or "everysec" must not pass.
    redis_command = services["redis"]["command"]
    options = dict(zip(redis_command[1::2], redis_command[2::2], strict=False))
    assert options.get("--appendonly") == "yes", redis_command
    assert options.get("--appendfsync") == "always", redis_command
    assert options.get("--maxmemory-policy") == "noeviction", redis_command
    assert services["redis"]["healthcheck"] and services["redis"]["volumes"]
    assert services["emulator"]["profiles"] == ["local"]
    assert services["prometheus"]["profiles"] == services["grafana"]["profiles"] == ["observability"]
    flower = services["flower"]
    assert "--persistent=True" in flower["command"] and flower["volumes"]
    assert ":?" in flower["environment"]["LIPSYNC_FLOWER_BASIC_AUTH"]  # refuses to start without auth
    for name in ("worker-transfer", "worker-api"):
        assert "container_name" not in services[name] and "ports" not in services[name]  # --scale works
        assert services[name]["environment"]["LIPSYNC_METRICS_PORT"] == "9808"


@pytest.mark.parametrize("name", sorted(our_services()))
def test_each_service_command_is_a_real_lipsync_entry_point(name: str) -> None:
    command = our_services()[name]["command"]
    result = subprocess.run(
        [lipsync_executable(), command[0], "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LIPSYNC_FLOWER_BASIC_AUTH": ""},
    )
    assert result.returncode == 0, result.stderr
    # `lipsync emulator --help` is the emulator's own help (argparse): its flags, not click's.
    assert "Usage: lipsync" in result.stdout or result.stdout.startswith("usage: lipsync emulator")


@pytest.mark.parametrize("name", sorted(our_services()))
def test_each_service_command_parses(name: str) -> None:
    """The arguments as the image receives them: click's for worker, Flower's own, the emulator's."""
    command, *args = our_services()[name]["command"]
    if command == "worker":
        from producers.cli import worker

        context = worker.make_context("worker", list(args))
        assert context.params["queues"] in ("transfer", "api")
    elif command == "flower":
        from flower.options import options

        for argument in args:
            assert argument.startswith("--"), argument
            option = argument[2:].split("=", 1)[0].replace("_", "-")
            assert option in options._options, f"Flower has no option --{option}"
    elif command == "serve":
        from producers.cli import serve

        context = serve.make_context("serve", list(args))
        assert context.params["host"] == "0.0.0.0"
    elif command == "emulator":
        from emulator.__main__ import parser

        parser().parse_args(args)
    else:
        pytest.fail(f"service {name} runs `lipsync {command}`, which this test does not know")


def env_file(name: str) -> dict[str, str]:
    lines = (ROOT / "deploy" / name).read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def test_compose_talks_to_fal_by_default_and_to_the_emulator_or_rabbitmq_by_their_env_files() -> None:
    from config.broker import broker_kind
    from config.settings import Settings
    from lipsync.checks import fal_key_problem

    services = compose()["services"]
    environment = services["worker-api"]["environment"]
    default = {name: re.sub(r"\$\{[A-Z_]+:-(.*)\}", r"\1", value) for name, value in environment.items()}
    # Without an env file: the real fal, and no key, so the worker refuses to start (README says so).
    assert fal_key_problem(Settings(fal_queue_url=default["LIPSYNC_FAL_QUEUE_URL"], fal_key=default["FAL_KEY"]))
    local = env_file("local.env")
    assert local["LIPSYNC_FAL_QUEUE_URL"] == "http://emulator:8080" and services["emulator"]["profiles"] == ["local"]
    assert fal_key_problem(Settings(fal_queue_url=local["LIPSYNC_FAL_QUEUE_URL"], fal_key=local["FAL_KEY"])) is None
    rabbit = env_file("rabbitmq.env")["LIPSYNC_BROKER_URL"]
    assert broker_kind(rabbit) == "amqp" and "@rabbitmq:5672/" in rabbit
    assert services["rabbitmq"]["profiles"] == ["rabbitmq"] and services["rabbitmq"]["healthcheck"]
    assert broker_kind(default["LIPSYNC_BROKER_URL"]) == "redis"


def test_dockerfile_runs_lipsync_as_a_non_root_user() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER (?!root)\S+", dockerfile, re.M)
    assert 'ENTRYPOINT ["lipsync"]' in dockerfile
    # Dependencies are installed from pyproject.toml alone, before the code is copied: a cached layer.
    assert dockerfile.index("COPY pyproject.toml") < dockerfile.index("COPY workers")


def test_mounted_files_exist() -> None:
    for service in compose()["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source


def exported_metric_names() -> set[str]:
    from lipsync.metrics import JobMetrics

    registry = CollectorRegistry()
    JobMetrics(registry)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names = {family.name + suffix for family in registry.collect() for suffix in suffixes[family.type]}
    # The gauges read from the job store at scrape time.
    return names | {"lipsync_jobs", "lipsync_jobs_at_fal", "lipsync_schedule_size", "lipsync_schedule_overdue"}


def test_prometheus_scrapes_the_workers_metrics_port_and_flower() -> None:
    config = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    workers = jobs["lipsync-workers"]["dns_sd_configs"][0]
    assert set(workers["names"]) == {"worker-transfer", "worker-api"}
    assert str(workers["port"]) == compose()["services"]["worker-api"]["environment"]["LIPSYNC_METRICS_PORT"]
    assert jobs["flower"]["static_configs"][0]["targets"] == ["flower:5555"]


def test_grafana_dashboard_only_charts_metrics_that_exist() -> None:
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/lipsync.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {name for expr in expressions for name in re.findall(r"\b(lipsync_[a-z_]+)", expr)}
    assert used and used <= exported_metric_names(), used - exported_metric_names()
    flower = {name for expr in expressions for name in re.findall(r"\b(flower_[a-z_]+)", expr)}
    assert flower <= {"flower_events_total", "flower_task_runtime_seconds_bucket"}
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/lipsync.yml").read_text())
    mount = next(v for v in compose()["services"]["grafana"]["volumes"] if v.startswith("./deploy/grafana/dashboards"))
    assert mount.split(":")[1] == provider["providers"][0]["options"]["path"]


def test_the_sentinel_profile_is_included_and_the_redis_urls_can_point_at_it() -> None:
    from lipsync.sentinel import parse_sentinel_url

    document = compose()
    assert "deploy/compose.sentinel.yml" in document["include"]
    sentinel: dict[str, Any] = yaml.safe_load((ROOT / "deploy/compose.sentinel.yml").read_text())
    names = {"redis-master", "redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"}
    assert names <= set(sentinel["services"])
    assert all(sentinel["services"][name]["profiles"] == ["sentinel"] for name in names)
    environment = document["services"]["worker-api"]["environment"]
    for name in ("LIPSYNC_REDIS_URL", "LIPSYNC_BROKER_URL", "LIPSYNC_REDIS_MIN_REPLICAS_ACK"):
        assert environment[name].startswith(f"${{{name}:-"), name
    # The URL the compose file's comment gives parses and names hosts that the profile runs.
    documented = re.search(r"LIPSYNC_REDIS_URL='([^']+)'", (ROOT / "deploy/compose.sentinel.yml").read_text())
    assert documented is not None
    address = parse_sentinel_url(documented.group(1))
    assert {host for host, _ in address.sentinels} <= set(sentinel["services"])
