"""The deployment files say what the code does: compose services, Redis users, commands, image.

No Docker engine runs here: compose.yaml is parsed with PyYAML (and checked against the Compose
Specification in tests/test_compose_schema.py), the Dockerfile line by line,
and the two entrypoint scripts are run with `sh` as the containers would run them.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from pipeline.cli import build_parser
from pipeline.localredis import free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PIPELINE_SERVICES = ("ingest-market", "ingest-user", "projector")
ROLES = ("ingest_market", "ingest_user", "projector", "reader", "listener", "status", "admin")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def acl_users() -> dict[str, str]:
    """User name -> its rule line, from the ACL template."""
    users = {}
    for line in (DEPLOY / "redis" / "users.acl.template").read_text().splitlines():
        if line.startswith("user "):
            users[line.split()[1]] = line
    return users


def parse_command(words: list[str]) -> str:
    """The module a compose `command` runs; fails as `pipeline` itself would on a bad one."""
    return str(build_parser(words).parse_args(words)._module)


def test_compose_has_redis_both_ingestors_and_the_projector(compose: dict[str, Any]) -> None:
    assert {"redis", *PIPELINE_SERVICES} <= set(compose["services"])
    assert compose["services"]["ingest-user"]["profiles"] == ["user"]
    for name in ("redis", "ingest-market", "projector"):
        assert "profiles" not in compose["services"][name], f"{name} must start by default"


def test_every_long_running_service_has_a_health_check_and_a_restart_policy(
    compose: dict[str, Any],
) -> None:
    for name in ("redis", *PIPELINE_SERVICES):
        service = compose["services"][name]
        assert service["restart"] in ("always", "unless-stopped", "on-failure"), name
        assert service["healthcheck"]["test"], name
        assert not service["healthcheck"].get("disable"), name
    for name in PIPELINE_SERVICES:
        service = compose["services"][name]
        test = " ".join(service["healthcheck"]["test"])
        assert "/healthz" in test and "PIPELINE_METRICS_PORT" in test
        assert int(service["environment"]["PIPELINE_METRICS_PORT"]) > 0


def test_projector_can_be_scaled(compose: dict[str, Any]) -> None:
    projector = compose["services"]["projector"]
    assert "container_name" not in projector
    assert "ports" not in projector  # a fixed host port would clash between copies


def test_each_command_is_a_real_pipeline_command(compose: dict[str, Any]) -> None:
    expected = {"ingest-market": "pipeline.ingest_market", "ingest-user": "pipeline.ingest_user",
                "projector": "projections.shell.project", "status": "pipeline.status"}
    for name, module in expected.items():
        assert parse_command(compose["services"][name]["command"]) == module


def test_each_service_connects_as_its_own_acl_user_with_its_own_secret(
    compose: dict[str, Any],
) -> None:
    users = acl_users()
    declared = set(compose["secrets"])
    for name, service in compose["services"].items():
        if name == "redis" or "redis" not in service["networks"]:
            continue  # only the services on Redis's network can reach it
        env = service["environment"]
        user = env["REDIS_USER"]
        assert user in users, f"{name} uses {user!r}, which the ACL does not define"
        secret = Path(env["REDIS_PASSWORD_FILE"]).name
        assert env["REDIS_PASSWORD_FILE"] == f"/run/secrets/{secret}"
        assert secret in service["secrets"] and secret in declared
        assert "REDIS_URL" not in env, "the password must come from the secret, not the file"
    users_of = {compose["services"][n]["environment"]["REDIS_USER"] for n in PIPELINE_SERVICES}
    assert users_of == {"ingest-market", "ingest-user", "projector"}


def test_redis_gets_every_role_password_and_keeps_an_append_only_file(
    compose: dict[str, Any],
) -> None:
    redis_service = compose["services"]["redis"]
    assert redis_service["image"].startswith("redis:7")
    roles = {u.replace("-", "_") for u in acl_users() if u != "default"}
    assert set(redis_service["secrets"]) == {f"redis_password_{r}" for r in roles}
    assert redis_service["environment"]["REDIS_APPENDFSYNC"] == "${REDIS_APPENDFSYNC:-everysec}"
    conf = (DEPLOY / "redis" / "redis.conf").read_text()
    assert re.search(r"^appendonly yes$", conf, re.M)
    assert re.search(r"^maxmemory-policy noeviction$", conf, re.M)
    entry = (DEPLOY / "redis" / "entrypoint.sh").read_text()
    assert "--aclfile" in entry and "${REDIS_APPENDFSYNC:-everysec}" in entry


def test_the_default_user_is_off_and_every_role_has_a_user() -> None:
    users = acl_users()
    assert set(users) >= {"default", "ingest-market", "ingest-user", "projector", "reader",
                          "listener"}
    assert " off " in users["default"] and " on " not in users["default"]


def test_api_key_and_secret_reach_the_user_ingestor_only_as_secret_files(
    compose: dict[str, Any],
) -> None:
    service = compose["services"]["ingest-user"]
    env = service["environment"]
    assert env["BINANCE_API_KEY_FILE"] == "/run/secrets/binance_api_key"
    assert env["BINANCE_API_SECRET_FILE"] == "/run/secrets/binance_api_secret"
    assert {"binance_api_key", "binance_api_secret"} <= set(service["secrets"])
    for name, other in compose["services"].items():
        if name != "ingest-user":
            assert "binance_api_key" not in other.get("secrets", []), name
        assert "BINANCE_API_KEY" not in other.get("environment", {}), name


def redis_bind_mounts(compose: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path of the redis service's bind mounts (named volumes left out)."""
    mounts = {}
    for volume in compose["services"]["redis"]["volumes"]:
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            mounts[target] = source
    return mounts


def test_redis_gets_only_the_files_its_entrypoint_reads_and_no_data(
    compose: dict[str, Any],
) -> None:
    assert not [p for p in DEPLOY.rglob("*") if p.suffix in (".rdb", ".aof")], \
        "a Redis data file is in deploy/: the server would start from it"
    mounts = redis_bind_mounts(compose)
    entry = (DEPLOY / "redis" / "entrypoint.sh").read_text()
    read = {"entrypoint.sh", *re.findall(r'"\$here/([\w.-]+)"', entry)}
    assert read == {"entrypoint.sh", "render-acl.sh", "users.acl.template",
                    "account.acl.template", "redis.conf"}
    assert mounts == {f"/etc/pipeline-redis/{name}": f"./deploy/redis/{name}" for name in read}
    assert all((ROOT / source).is_file() for source in mounts.values())
    # the data lives in the named volume, where redis.conf points the server
    assert '--dir "${REDIS_DATA_DIR:-/data}"' in entry
    assert "redis-data:/data" in compose["services"]["redis"]["volumes"]
    assert "redis-data" in compose["volumes"]


def test_redis_with_the_compose_config_starts_empty_and_keeps_what_it_was_given(
    tmp_path: Path,
) -> None:
    """No shipped dump is needed: the server of deploy/redis/redis.conf creates its own files
    in an empty data folder and finds its data there after a restart."""
    from tests.test_acl import render_acl

    acl = render_acl(tmp_path / "acl")
    data = tmp_path / "data"
    data.mkdir()
    port = free_port()
    # the entrypoint gives `--dir` (the compose volume, /data) after the file: here the empty
    # temporary folder; every line of the file stays as compose has it
    conf = DEPLOY / "redis" / "redis.conf"

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            ["redis-server", str(conf), "--dir", str(data), "--port", str(port),
             "--bind", "127.0.0.1", "--aclfile", str(acl),
             "--appendfsync", "everysec", "--logfile", str(tmp_path / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                if admin().ping():
                    return proc
            except redis.ConnectionError:
                assert proc.poll() is None, (tmp_path / "redis.log").read_text()[-800:]
                assert time.monotonic() < deadline, "redis-server did not answer"
                time.sleep(0.05)

    def admin() -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, username="admin", password="pw-admin")

    proc = start()
    try:
        client = admin()
        client.xadd("raw:user", {"frame": b"{}"})
        client.close()
        proc.terminate()
        assert proc.wait(10) == 0
        assert (data / "appendonlydir").is_dir()
        proc = start()
        client = admin()
        assert client.xlen("raw:user") == 1
        client.close()
    finally:
        proc.terminate()
        proc.wait(10)


def test_readme_reader_urls_name_a_user_the_acl_defines_on_the_compose_port(
    compose: dict[str, Any],
) -> None:
    """What a newcomer copies from the README connects to the compose Redis (no default user)."""
    readme = (ROOT / "README.md").read_text()
    users = acl_users()
    urls = re.findall(r"redis://([\w-]+):(.+?)@([\w.]+):(\d+)/\d+", readme)
    assert len(urls) >= 3, urls  # the table, the Python example, the listener's command
    assert "ports" not in compose["services"]["redis"]  # internal network only
    host = yaml.safe_load((DEPLOY / "compose.host-port.yaml").read_text())
    [mapping] = host["services"]["redis"]["ports"]
    default = re.fullmatch(r"\$\{REDIS_HOST_PORT:-([\d.]+):(\d+)\}:6379", mapping)
    assert default, mapping
    made = re.search(r"for role in ([\w ]+); do", (DEPLOY / "make-secrets.sh").read_text())
    assert made
    for user, password, host, port in urls:
        assert user in users and " on " in users[user], f"{user!r} is not an ACL user"
        assert (host, port) in {("localhost", default[2]), (default[1], default[2])}
        # the password comes from the secret file (or stands for it), never written out
        assert "redis_password_" in password or password in ("PASSWORD", "{password}"), password
        role = user.replace("-", "_")
        assert role in made[1].split(), f"make-secrets.sh writes no password for {user}"
        assert f"secrets/redis_password_{role}" in readme
    # the least-privileged user for each job: the analyzer reads, the listener runs groups
    assert {u[0] for u in urls} == {"reader", "listener"}
    assert "%R~@PREFIX@:*" in users["reader"] and "+xreadgroup" not in users["reader"]
    assert "+xreadgroup" in users["listener"]
    assert "deploy/make-secrets.sh" in readme and "docs/contract.md" in readme
    assert "../shared" not in readme


# --- Dockerfile ---------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_image_is_slim_python_311_and_runs_as_a_non_root_user() -> None:
    instructions = dockerfile_instructions()
    froms = [rest for word, rest in instructions if word == "FROM"]
    assert all(f.split()[0] == "python:3.11-slim" for f in froms)
    users = [rest for word, rest in instructions if word == "USER"]
    assert users, "no USER: the image would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    # USER comes after every RUN of the final stage that needs root (useradd)
    last_from = max(i for i, (w, _) in enumerate(instructions) if w == "FROM")
    user_at = max(i for i, (w, _) in enumerate(instructions) if w == "USER")
    assert user_at > last_from


def test_image_installs_what_the_lock_file_pins_and_the_command_picks_the_role() -> None:
    instructions = dockerfile_instructions()
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    copies = " ".join(rest for word, rest in instructions if word == "COPY")
    assert "requirements.lock" in copies
    assert re.search(r"pip install (-c|-r|--constraint|--requirement) requirements\.lock", runs)
    entry = json.loads(next(rest for word, rest in instructions if word == "ENTRYPOINT"))
    assert entry[-1] == "pipeline"
    assert (DEPLOY / "pipeline-entrypoint.sh").exists()


def test_every_runtime_dependency_is_pinned_by_the_lock_file() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = {
        line.split("==")[0].lower().replace("_", "-")
        for line in (ROOT / "requirements.lock").read_text().splitlines() if "==" in line
    }
    for dep in project["dependencies"]:
        name = re.split(r"[\[<>=! ]", dep, maxsplit=1)[0].lower().replace("_", "-")
        assert name in pinned, f"{name} is not pinned in requirements.lock"


def test_build_context_leaves_out_secrets_and_the_virtualenv() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"secrets", ".venv", ".git"} <= set(ignored)


# --- entrypoint scripts -------------------------------------------------------------------

def run_sh(script: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(script), *args], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", **env}, timeout=10)


def test_pipeline_entrypoint_builds_the_redis_url_from_the_role_user_and_secret(
    tmp_path: Path,
) -> None:
    secret = tmp_path / "pw"
    secret.write_text("0a1b2c3d\n")
    done = run_sh(DEPLOY / "pipeline-entrypoint.sh", "printenv", "REDIS_URL",
                  env={"REDIS_USER": "projector", "REDIS_PASSWORD_FILE": str(secret)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "redis://projector:0a1b2c3d@redis:6379/0"


def test_pipeline_entrypoint_refuses_a_password_it_cannot_put_in_a_url_without_showing_it(
    tmp_path: Path,
) -> None:
    secret = tmp_path / "pw"
    secret.write_text("p@ss/word")
    done = run_sh(DEPLOY / "pipeline-entrypoint.sh", "true",
                  env={"REDIS_USER": "projector", "REDIS_PASSWORD_FILE": str(secret)})
    assert done.returncode == 2
    assert "REDIS_PASSWORD_FILE" in done.stderr and "p@ss/word" not in done.stderr


def test_acl_renderer_names_a_missing_secret_and_writes_no_password_in_clear(
    tmp_path: Path,
) -> None:
    template = DEPLOY / "redis" / "users.acl.template"
    out = tmp_path / "users.acl"
    done = run_sh(DEPLOY / "redis" / "render-acl.sh", str(template), str(out),
                  env={"SECRETS_DIR": str(tmp_path)})
    assert done.returncode == 2 and "redis_password_" in done.stderr
    assert not out.exists()
    for role in ROLES:
        (tmp_path / f"redis_password_{role}").write_text(f"secret-of-{role}\n")
    done = run_sh(DEPLOY / "redis" / "render-acl.sh", str(template), str(out),
                  env={"SECRETS_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert "secret-of-" not in text and "@" not in text.replace("@all", "")
    assert "%R~websocket:* " in text


def test_generated_secrets_are_url_safe_and_render_the_acl(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    done = run_sh(DEPLOY / "make-secrets.sh", str(secrets), env={})
    assert done.returncode == 0, done.stderr
    for role in ROLES:
        assert re.fullmatch(r"[0-9a-f]{48}", (secrets / f"redis_password_{role}").read_text())
    assert (secrets / "binance_api_key").read_text() == ""
    before = (secrets / "redis_password_admin").read_text()
    run_sh(DEPLOY / "make-secrets.sh", str(secrets), env={})
    assert (secrets / "redis_password_admin").read_text() == before  # existing ones are kept
    done = run_sh(DEPLOY / "redis" / "render-acl.sh", str(DEPLOY / "redis" / "users.acl.template"),
                  str(tmp_path / "users.acl"), env={"SECRETS_DIR": str(secrets)})
    assert done.returncode == 0, done.stderr


# --- the network, the image, TLS (issue #17) -----------------------------------------------

TLS_OVERRIDE = DEPLOY / "compose.tls.yaml"
HOST_PORT_OVERRIDE = DEPLOY / "compose.host-port.yaml"
LIST_MERGED = ("secrets", "networks")  # compose appends these; other lists are replaced


def merge(base: Any, override: Any, key: str = "") -> Any:
    """`docker compose -f base -f override` for the parts of compose these files use."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            out[k] = merge(base[k], v, k) if k in base else v
        return out
    if isinstance(base, list) and isinstance(override, list) and key in LIST_MERGED:
        return base + [v for v in override if v not in base]
    return override


def env_default(value: str) -> str:
    """`${NAME:-default}` -> default, as compose resolves it when NAME is not set."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def test_redis_image_is_pinned_to_the_redis_version_the_tests_run(
    compose: dict[str, Any],
) -> None:
    image = compose["services"]["redis"]["image"]
    assert re.fullmatch(r"redis:\d+\.\d+\.\d+", image), image
    local = subprocess.run(["redis-server", "--version"], capture_output=True, text=True,
                           check=True).stdout
    tested = re.search(r"v=(\d+)\.(\d+)\.", local)
    assert tested is not None
    assert image.split(":")[1].split(".")[:2] == [tested[1], tested[2]]


def test_redis_publishes_no_port_and_only_the_pipeline_containers_reach_it(
    compose: dict[str, Any],
) -> None:
    redis_service = compose["services"]["redis"]
    assert "ports" not in redis_service
    assert redis_service["networks"] == ["redis"]
    assert compose["networks"]["redis"] == {"internal": True}
    for name in (*PIPELINE_SERVICES, "status"):
        assert "redis" in compose["services"][name]["networks"], name
    assert compose["services"]["status"]["networks"] == ["redis"]  # nothing to reach outside
    # the opt-in override publishes it for readers on the host, on loopback unless told
    host = merge(compose, yaml.safe_load(HOST_PORT_OVERRIDE.read_text()))
    (port,) = host["services"]["redis"]["ports"]
    assert env_default(port) == "127.0.0.1:6379:6379"
    assert set(host["services"]["redis"]["networks"]) == {"redis", "host-readers"}
    assert "internal" not in host["networks"]["host-readers"]


def test_redis_conf_does_not_rely_on_the_acl_alone() -> None:
    conf = (DEPLOY / "redis" / "redis.conf").read_text()
    for line in ("protected-mode yes", "enable-debug-command no", "enable-module-command no",
                 "enable-protected-configs no"):
        assert re.search(rf"^{line}$", conf, re.M), line
    assert not re.search(r"^protected-mode no", conf, re.M)


def test_tls_profile_closes_the_plaintext_port_and_every_service_checks_the_ca(
    compose: dict[str, Any], tmp_path: Path,
) -> None:
    tls = merge(compose, yaml.safe_load(TLS_OVERRIDE.read_text()))
    redis_service = tls["services"]["redis"]
    assert redis_service["environment"]["REDIS_TLS"] == "yes"
    assert {"redis_tls_cert", "redis_tls_key", "redis_tls_ca"} <= set(redis_service["secrets"])
    assert "--tls --cacert /run/secrets/redis_tls_ca" in " ".join(
        redis_service["healthcheck"]["test"])
    # every service that connects to Redis, the one-shot `functions` loader included
    clients = [name for name, svc in compose["services"].items()
               if "REDIS_USER" in svc.get("environment", {})]
    assert {*PIPELINE_SERVICES, "status", "functions"} <= set(clients)
    for name in clients:
        service = tls["services"][name]
        assert service["environment"]["REDIS_SCHEME"] == "rediss", name
        assert service["environment"]["REDIS_CA_FILE"] == "/run/secrets/redis_tls_ca", name
        assert "redis_tls_ca" in service["secrets"] and "redis_tls_key" not in service["secrets"]
        assert service["environment"]["REDIS_USER"] == compose["services"][name][
            "environment"]["REDIS_USER"]  # the override changes the transport, not the user
    # every secret file either file names is one that make-secrets.sh creates
    done = run_sh(DEPLOY / "make-secrets.sh", str(tmp_path / "secrets"), env={})
    assert done.returncode == 0, done.stderr
    for name, secret in tls["secrets"].items():
        path = tmp_path / secret["file"]
        assert path.is_file() and (path.stat().st_size or name.startswith("binance_")), name


def fake_image_entrypoint(folder: Path) -> str:
    """A PATH holding a `docker-entrypoint.sh` that prints the command it would run."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    script = bin_dir / "docker-entrypoint.sh"
    script.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    script.chmod(0o755)
    return f"{bin_dir}:/usr/bin:/bin"


def test_redis_entrypoint_in_tls_mode_listens_on_tls_only(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    assert run_sh(DEPLOY / "make-secrets.sh", str(secrets), env={}).returncode == 0
    env = {"PATH": fake_image_entrypoint(tmp_path), "SECRETS_DIR": str(secrets),
           "REDIS_RUN_DIR": str(tmp_path / "run")}
    plain = run_sh(DEPLOY / "redis" / "entrypoint.sh", env=env)
    assert plain.returncode == 0, plain.stderr
    assert "--tls-port" not in plain.stdout.split()
    done = run_sh(DEPLOY / "redis" / "entrypoint.sh", env={**env, "REDIS_TLS": "yes"})
    assert done.returncode == 0, done.stderr
    args = done.stdout.split()
    assert args[args.index("--port") + 1] == "0"
    assert args[args.index("--tls-port") + 1] == "6379"
    key = Path(args[args.index("--tls-key-file") + 1])
    assert key.read_bytes() == (secrets / "redis_tls_key").read_bytes()
    assert key.stat().st_mode & 0o077 == 0
    (secrets / "redis_tls_key").unlink()
    missing = run_sh(DEPLOY / "redis" / "entrypoint.sh", env={**env, "REDIS_TLS": "yes"})
    assert missing.returncode == 2 and "redis_tls_key" in missing.stderr


def test_make_secrets_signs_a_server_certificate_for_the_names_clients_use(
    tmp_path: Path,
) -> None:
    secrets = tmp_path / "secrets"
    assert run_sh(DEPLOY / "make-secrets.sh", str(secrets), env={}).returncode == 0
    ca, cert = secrets / "redis_tls_ca", secrets / "redis_tls_cert"
    for name in ("redis", "localhost"):
        done = subprocess.run(["openssl", "verify", "-CAfile", str(ca), "-verify_hostname",
                               name, str(cert)], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    wrong = subprocess.run(["openssl", "verify", "-CAfile", str(ca), "-verify_hostname",
                            "example.com", str(cert)], capture_output=True, text=True)
    assert wrong.returncode != 0
    for key in ("redis_tls_key", "redis_tls_ca_key"):
        assert (secrets / key).stat().st_mode & 0o077 == 0, key
    before = cert.read_bytes()
    run_sh(DEPLOY / "make-secrets.sh", str(secrets), env={})
    assert cert.read_bytes() == before  # kept, like the passwords


def test_pipeline_entrypoint_builds_a_rediss_url_that_checks_the_ca(tmp_path: Path) -> None:
    secret, ca = tmp_path / "pw", tmp_path / "ca.crt"
    secret.write_text("0a1b2c3d\n")
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    env = {"REDIS_USER": "projector", "REDIS_PASSWORD_FILE": str(secret),
           "REDIS_SCHEME": "rediss", "REDIS_CA_FILE": str(ca)}
    done = run_sh(DEPLOY / "pipeline-entrypoint.sh", "printenv", "REDIS_URL", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"rediss://projector:0a1b2c3d@redis:6379/0?ssl_ca_certs={ca}"
    gone = run_sh(DEPLOY / "pipeline-entrypoint.sh", "true",
                  env={**env, "REDIS_CA_FILE": str(tmp_path / "missing")})
    assert gone.returncode == 2 and "REDIS_CA_FILE" in gone.stderr
    bad = run_sh(DEPLOY / "pipeline-entrypoint.sh", "true", env={**env, "REDIS_SCHEME": "http"})
    assert bad.returncode == 2 and "REDIS_SCHEME" in bad.stderr and "0a1b2c3d" not in bad.stderr


# --- observability: Prometheus and Grafana (issue #18) -------------------------------------

OBSERVABILITY = ("prometheus", "grafana")


def bind_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Host path -> container path of a service's bind mounts."""
    return {v.split(":")[0]: v.split(":")[1] for v in service["volumes"] if v.startswith(".")}


def test_prometheus_and_grafana_start_only_in_their_profile_from_pinned_images(
    compose: dict[str, Any],
) -> None:
    for name in OBSERVABILITY:
        service = compose["services"][name]
        assert service["profiles"] == ["observability"], name
        assert service["restart"] == "unless-stopped", name
        assert service["healthcheck"]["test"], name
    assert re.fullmatch(r"grafana/grafana-oss:\d+\.\d+\.\d+", compose["services"]["grafana"][
        "image"])
    image = compose["services"]["prometheus"]["image"]
    pinned = re.fullmatch(r"prom/prometheus:v(\d+)\.(\d+)\.\d+", image)
    assert pinned, image
    # the Prometheus whose promtool tests the rules (tests/test_alerts.py)
    local = subprocess.run(["prometheus", "--version"], capture_output=True, text=True,
                           check=True)
    tested = re.search(r"version (\d+)\.(\d+)\.", local.stdout + local.stderr)
    assert tested is not None
    assert pinned.groups() == tested.groups()


def test_prometheus_reads_its_files_from_deploy_and_scrapes_every_pipeline_service(
    compose: dict[str, Any],
) -> None:
    prometheus = compose["services"]["prometheus"]
    mounts = bind_mounts(prometheus)
    config_path = mounts["./deploy/prometheus/prometheus.yml"]
    assert f"--config.file={config_path}" in prometheus["command"]
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    for rule_file in config["rule_files"]:
        assert mounts[f"./deploy/prometheus/{rule_file}"] == str(
            Path(config_path).parent / rule_file)
    targets = {}
    for job in config["scrape_configs"]:
        [discovery] = job["dns_sd_configs"]
        [name] = discovery["names"]
        targets[name] = discovery["port"]
    assert set(targets) == set(PIPELINE_SERVICES)
    for name, port in targets.items():
        service = compose["services"][name]
        assert int(service["environment"]["PIPELINE_METRICS_PORT"]) == port, name
        assert str(port) in service["expose"], name
        assert set(service["networks"]) & set(prometheus["networks"]), name


def test_observability_reaches_neither_redis_nor_the_exchange_and_listens_on_loopback(
    compose: dict[str, Any],
) -> None:
    for name in OBSERVABILITY:
        networks = compose["services"][name]["networks"]
        assert "redis" not in networks and "egress" not in networks, name
    assert compose["networks"]["metrics"] == {"internal": True}
    assert compose["services"]["grafana"]["networks"] == ["observability"]
    for name, port in (("prometheus", 9090), ("grafana", 3000)):
        [mapping] = compose["services"][name]["ports"]
        assert env_default(mapping) == f"127.0.0.1:{port}:{port}", name


def test_grafana_admin_password_comes_from_a_secret_that_make_secrets_writes(
    compose: dict[str, Any], tmp_path: Path,
) -> None:
    grafana = compose["services"]["grafana"]
    env = grafana["environment"]
    path = env["GF_SECURITY_ADMIN_PASSWORD__FILE"]
    secret = Path(path).name
    assert path == f"/run/secrets/{secret}"
    assert secret in grafana["secrets"] and secret in compose["secrets"]
    assert "GF_SECURITY_ADMIN_PASSWORD" not in env
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false" and env["GF_USERS_ALLOW_SIGN_UP"] == "false"
    secrets = tmp_path / "secrets"
    assert run_sh(DEPLOY / "make-secrets.sh", str(secrets), env={}).returncode == 0
    made = secrets / Path(compose["secrets"][secret]["file"]).name
    assert re.fullmatch(r"[0-9a-f]{48}", made.read_text())
    for folder in ("grafana", "prometheus"):
        for file in (DEPLOY / folder).rglob("*"):
            if file.is_file():
                assert "password" not in file.read_text().lower(), file
