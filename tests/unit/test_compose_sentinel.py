"""deploy/compose.sentinel.yml checks out without a Docker engine: it matches the compose spec,
it is the topology the docs promise (1 master, 1 replica, 3 Sentinels with quorum 2), and the
Sentinel URL its header tells users to export names its Sentinels and its master."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from lipsync.sentinel import parse_sentinel_url

ROOT = Path(__file__).resolve().parents[2]
FILE = ROOT / "deploy/compose.sentinel.yml"


def sentinel_compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(FILE.read_text())
    return document


def test_sentinel_compose_matches_the_compose_spec() -> None:
    schema = json.loads((ROOT / "deploy/schemas/compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{error.json_path}: {error.message}" for error in validator.iter_errors(sentinel_compose())]
    assert errors == []


def test_one_master_one_replica_three_sentinels_all_in_the_sentinel_profile() -> None:
    services = sentinel_compose()["services"]
    assert set(services) == {"redis-master", "redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"}
    assert all(service["profiles"] == ["sentinel"] for service in services.values())
    for name in ("redis-master", "redis-replica"):
        command = services[name]["command"]
        assert {"--appendonly", "--appendfsync", "always", "noeviction"} <= set(command), name
    assert services["redis-replica"]["command"][-3:] == ["--replicaof", "redis-master", "6379"]
    assert "--replicaof" not in services["redis-master"]["command"]
    for index in (1, 2, 3):
        script = services[f"sentinel-{index}"]["command"][0]
        assert "'sentinel monitor lipsync redis-master 6379 2'" in script
        assert "--sentinel" in script


def test_the_url_the_header_exports_names_these_sentinels_and_master() -> None:
    exported = re.search(r"export LIPSYNC_REDIS_URL='([^']+)'", FILE.read_text())
    assert exported is not None
    address = parse_sentinel_url(exported.group(1))
    services = sentinel_compose()["services"]
    assert {host for host, _ in address.sentinels} == {n for n in services if n.startswith("sentinel-")}
    assert {port for _, port in address.sentinels} == {26379}
    assert address.master_name == "lipsync"
