"""The layout is a rule, not a habit: what each room of the code may import.

Checked in a fresh interpreter per module, as a reader importing it would see it:
- every module under `projections/core/` (the pure core) loads neither trio, redis, httpx nor
  prometheus_client, nor anything of the Redis shell;
- the consumer library (`projections.client`) loads neither trio nor the projector (its shell
  or its folds), so the analyzer and the listener import only redis-py and what they call;
- the other pure modules on the ingest side (event-log format, stream kinds, buffer, weight,
  health rules) load neither trio nor redis.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

CORE = sorted(f"projections.core.{p.stem}" for p in (ROOT / "projections" / "core").glob("*.py")
              if p.stem != "__init__")
PURE_INGEST = ["pipeline.eventlog", "pipeline.streams", "pipeline.buffer", "pipeline.weight",
               "pipeline.health", "pipeline.backoff"]


def loaded_by(module: str) -> set[str]:
    code = (f"import sys, json, {module}; "
            "print(json.dumps(sorted(m for m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    return set(json.loads(out))


def top_level(mods: set[str]) -> set[str]:
    return {m.split(".")[0] for m in mods}


def test_the_core_folder_holds_the_folds() -> None:
    assert {"projections.core.market", "projections.core.orders", "projections.core.batch",
            "projections.core.keys"} <= set(CORE)


@pytest.mark.parametrize("module", CORE)
def test_core_module_imports_no_io(module: str) -> None:
    mods = loaded_by(module)
    assert not top_level(mods) & {"trio", "redis", "httpx", "prometheus_client", "hiredis"}, \
        f"{module} pulls in I/O"
    assert not {m for m in mods if m.startswith(("projections.shell", "projections.client",
                                                  "pipeline.metrics"))}


def test_consumer_library_imports_neither_trio_nor_the_projector() -> None:
    mods = loaded_by("projections.client")
    assert "trio" not in top_level(mods)
    projector = {m for m in mods if m.startswith("projections.")
                 and not m.startswith(("projections.client", "projections.core.keys"))
                 and m != "projections.core"}
    assert not projector, f"the library loads {sorted(projector)}"


@pytest.mark.parametrize("module", PURE_INGEST)
def test_pure_ingest_module_imports_neither_trio_nor_redis(module: str) -> None:
    assert not top_level(loaded_by(module)) & {"trio", "redis"}
