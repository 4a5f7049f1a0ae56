"""compose.yaml is a valid Compose file: checked against the Compose Specification's own JSON
schema, as `docker compose` checks it, with no Docker engine here.

The schema is not in the repository: scripts/setup.sh reads it out of a pinned PyPI wheel into
.cache/compose-spec/ (see there). The test fails, rather than skips, when it is missing.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
import yaml

from tests.conftest import ROOT

SCHEMA = ROOT / ".cache" / "compose-spec" / "compose-spec.json"


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    assert SCHEMA.is_file(), f"{SCHEMA} is missing: run `bash scripts/setup.sh`"
    schema = orjson.loads(SCHEMA.read_bytes())
    assert schema["title"] == "Compose Specification"
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def problems(validator: jsonschema.protocols.Validator, doc: object) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in validator.iter_errors(doc)]


def test_compose_file_follows_the_compose_specification(
    validator: jsonschema.protocols.Validator, compose: dict[str, Any],
) -> None:
    assert problems(validator, compose) == []


def _typo_in_a_service_key(doc: dict[str, Any]) -> None:
    doc["services"]["projector"]["comand"] = doc["services"]["projector"].pop("command")


def _ports_as_a_number(doc: dict[str, Any]) -> None:
    doc["services"]["redis"]["ports"] = 6379


def _unknown_top_level_key(doc: dict[str, Any]) -> None:
    doc["service"] = doc.pop("services")


def _bad_depends_on_condition(doc: dict[str, Any]) -> None:
    doc["services"]["projector"]["depends_on"]["redis"]["condition"] = "service_ready"


def _restart_as_a_list(doc: dict[str, Any]) -> None:
    doc["services"]["ingest-market"]["restart"] = ["unless-stopped"]


def _secret_without_a_source(doc: dict[str, Any]) -> None:
    doc["secrets"]["redis_password_reader"] = {"filename": "./secrets/redis_password_reader"}


@pytest.mark.parametrize("mutate", [
    _typo_in_a_service_key, _ports_as_a_number, _unknown_top_level_key,
    _bad_depends_on_condition, _restart_as_a_list, _secret_without_a_source,
], ids=lambda f: f.__name__.strip("_"))
def test_a_broken_copy_of_the_compose_file_is_refused(
    validator: jsonschema.protocols.Validator, compose: dict[str, Any],
    mutate: Callable[[dict[str, Any]], None],
) -> None:
    broken = copy.deepcopy(compose)
    mutate(broken)
    assert problems(validator, broken), f"{mutate.__name__} went unnoticed"


def test_a_misspelt_key_in_a_copy_of_the_file_is_refused_in_every_service_sharing_it(
    validator: jsonschema.protocols.Validator, tmp_path: Path,
) -> None:
    text = (ROOT / "compose.yaml").read_text()
    assert text.count("stop_grace_period:") == 1  # in the x-pipeline block the services merge
    copy_path = tmp_path / "compose.yaml"
    copy_path.write_text(text.replace("stop_grace_period:", "stop_grace_periods:"))
    found = problems(validator, yaml.safe_load(copy_path.read_text()))
    services = {p.split(":")[0].split("/")[1] for p in found}
    assert services >= {"ingest-market", "ingest-user", "projector", "status"}, found
