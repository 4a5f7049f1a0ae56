"""The core is pure: parsing, view folding, book sequencing, order state and the ingest
buffer import neither trio nor redis (checked in a fresh interpreter, as a reader would)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

PURE = [
    "pipeline.eventlog", "pipeline.streams", "pipeline.buffer", "pipeline.weight",
    "pipeline.health", "projections.core", "projections.frames", "projections.market",
    "projections.depthbook", "projections.orders", "projections.account",
    "projections.userevents",
]


@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports_neither_trio_nor_redis(module: str) -> None:
    code = (f"import sys, {module}; "
            "print(','.join(m for m in ('trio', 'redis') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout.strip()
    assert out == "", f"{module} pulls in {out}"
