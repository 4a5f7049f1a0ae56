"""The Redis Cluster deployment (deploy/compose.cluster.yaml over compose.yaml): a valid
Compose file, six nodes configured alike, every pipeline service in cluster mode after the
cluster is made, and the redis entrypoint's cluster mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.conftest import ROOT
from tests.test_compose_schema import problems
from tests.test_compose_schema import validator as validator  # the fixture
from tests.test_deploy import DEPLOY, PIPELINE_SERVICES, fake_image_entrypoint, merge, run_sh

CLUSTER_OVERRIDE = DEPLOY / "compose.cluster.yaml"
NODES = ("redis", "redis-2", "redis-3", "redis-4", "redis-5", "redis-6")


@pytest.fixture(scope="module")
def merged() -> dict[str, Any]:
    base = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return merge(base, yaml.safe_load(CLUSTER_OVERRIDE.read_text()))  # type: ignore[no-any-return]


def test_the_cluster_profile_is_a_valid_compose_file(
        validator: jsonschema.protocols.Validator, merged: dict[str, Any]) -> None:
    assert problems(validator, merged) == []


def test_six_nodes_alike_and_every_client_in_cluster_mode_once_the_cluster_is_made(
        merged: dict[str, Any]) -> None:
    services = merged["services"]
    first = services["redis"]
    for name in NODES:
        node = services[name]
        assert node["environment"]["REDIS_CLUSTER"] == "yes", name
        assert node["hostname"] == name  # what the node announces to clients
        assert node["image"] == first["image"] and node["entrypoint"] == first["entrypoint"]
        assert set(node["secrets"]) == set(first["secrets"]), name  # the same ACL users
        assert node["networks"] == ["redis"] and "ports" not in node
    data = [v for n in NODES for v in services[n]["volumes"] if v.endswith(":/data")]
    assert len(set(data)) == 6  # a data volume (and nodes.conf) of its own each
    clients = [n for n, s in services.items() if "REDIS_USER" in s.get("environment", {})]
    assert {*PIPELINE_SERVICES, "status", "functions"} <= set(clients)
    for name in clients:
        service = services[name]
        assert service["environment"]["PIPELINE_REDIS_CLUSTER"] == "1", name
        assert service["depends_on"]["redis-cluster"] == {
            "condition": "service_completed_successfully"}, name
    init = services["redis-cluster"]
    assert set(init["depends_on"]) == set(NODES)
    script = init["command"][0]
    assert "--cluster create" in script and "--cluster-replicas 1" in script
    assert all(h in script for h in NODES)


def test_redis_entrypoint_in_cluster_mode_starts_a_cluster_node_with_the_cluster_acl(
        tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    assert run_sh(DEPLOY / "make-secrets.sh", str(secrets), env={}).returncode == 0
    env = {"PATH": fake_image_entrypoint(tmp_path), "SECRETS_DIR": str(secrets),
           "REDIS_RUN_DIR": str(tmp_path / "run")}
    plain = run_sh(DEPLOY / "redis" / "entrypoint.sh", env=env)
    assert plain.returncode == 0, plain.stderr
    assert "--cluster-enabled" not in plain.stdout.split()
    assert "+asking" not in (tmp_path / "run" / "users.acl").read_text()
    done = run_sh(DEPLOY / "redis" / "entrypoint.sh", env={**env, "REDIS_CLUSTER": "yes"})
    assert done.returncode == 0, done.stderr
    args = done.stdout.split()
    assert args[args.index("--cluster-enabled") + 1] == "yes"
    assert args[args.index("--cluster-preferred-endpoint-type") + 1] == "hostname"
    acl = (tmp_path / "run" / "users.acl").read_text().splitlines()
    services = [line for line in acl if not line.startswith(("user default ", "user admin "))]
    assert services and all("+cluster|slots" in line and "+asking" in line for line in services)
    bad = run_sh(DEPLOY / "redis" / "entrypoint.sh", env={**env, "REDIS_CLUSTER": "maybe"})
    assert bad.returncode == 2 and "REDIS_CLUSTER" in bad.stderr
