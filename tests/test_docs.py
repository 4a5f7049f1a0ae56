"""The docs name what exists: the paths they cite are in the tree, and the contract's keys,
settings and flags are the ones the code builds and reads.

Paths: every token in backticks (outside fenced code blocks) that contains a `/` and ends with
a known file extension or with `/` is a repository path, relative to the repository root; in a
list item that opens with a backticked directory (`- `pipeline/`: settings (`config.py`)...`)
it may also be relative to that directory. URLs (`redis://...`) and exchange paths
(`/fapi/v1/depth`) are not repository paths. A directory the repository's `.gitignore` names
(`bench/results/`) is an output location: it exists only once something wrote to it.
"""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

import pytest

from pipeline.cli import COMMANDS, COMMON_FLAGS
from pipeline.config import DEFAULTS
from pipeline.eventlog import DEFAULT_RETENTION
from projections.core.keys import (
    KEY_CONN_MARKET,
    KEY_CONN_USER,
    KEY_DEPTH_SNAPSHOTS,
    KEY_OTHER,
    KEY_USER,
    Keys,
    dlq_key,
    lease_key,
    market_key,
)
from tests.conftest import ROOT

DOCS = sorted((ROOT / "docs").glob("*.md"))
DOCUMENTS = [*DOCS, ROOT / "README.md"]
CONTRACT = ROOT / "docs" / "contract.md"

PATH_ENDINGS = (".py", ".lua", ".md", ".sh", ".yaml", ".yml", ".toml", ".conf", ".template",
                ".lock", ".json", ".txt", ".cfg", ".ini", "/")
_FENCE = re.compile(r"^```.*?^```[^\n]*$", re.MULTILINE | re.DOTALL)
_SPAN = re.compile(r"`([^`\n]+)`")
_BULLET = re.compile(r"^\s*(?:[-*]|\d+\.)\s")
_BULLET_BASE = re.compile(r"^\s*(?:[-*]|\d+\.)\s+`([^`\s]+/)`")


# --- reading the documents --------------------------------------------------------------

def prose(text: str) -> str:
    """The text without fenced code blocks (their lines kept blank, so list items still end)."""
    return _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def path_tokens(span: str) -> list[str]:
    """The repository paths among the words of one backticked span."""
    out = []
    for word in span.split():
        word = word.strip("(),;")
        if ("/" in word and word.endswith(PATH_ENDINGS) and "://" not in word
                and not word.startswith("/")):
            out.append(word)
    return out


def cited_paths(text: str) -> list[tuple[str, str | None]]:
    """(path, the directory its list item opens with, or None) for every cited path."""
    out: list[tuple[str, str | None]] = []
    base: str | None = None
    for line in prose(text).splitlines():
        if not line.strip() or line.lstrip().startswith(("#", "|")):
            base = None
        elif _BULLET.match(line):
            lead = _BULLET_BASE.match(line)
            base = lead.group(1) if lead else None
        for span in _SPAN.findall(line):
            out.extend((token, base) for token in path_tokens(span))
    return out


def ignored_dirs(root: Path) -> tuple[str, ...]:
    """Plain directory entries of `.gitignore` (`bench/results/`), without glob patterns."""
    gitignore = root / ".gitignore"
    lines = gitignore.read_text().splitlines() if gitignore.exists() else []
    return tuple(line.strip() for line in lines
                 if line.strip().endswith("/") and not any(c in line for c in "*?[!#"))


def outside(root: Path, token: str) -> bool:
    return not (root / token).resolve().is_relative_to(root.resolve())


def found(root: Path, token: str, base: str | None) -> bool:
    for candidate in (token, f"{base}{token}" if base else None):
        if candidate is None or outside(root, candidate):
            continue
        path = root / candidate
        if path.is_dir() if token.endswith("/") else path.is_file():
            return True
    return token.startswith(ignored_dirs(root))


def missing_paths(text: str, root: Path = ROOT) -> list[str]:
    """Cited repository paths that are not in the tree at `root` (paths that leave the
    repository are the business of `leaving_paths`)."""
    return sorted({token for token, base in cited_paths(text)
                   if not outside(root, token) and not found(root, token, base)})


def leaving_paths(text: str, root: Path = ROOT) -> list[str]:
    """Cited paths outside the repository (`../shared/SPEC.md`): a clone does not have them."""
    return sorted({token for token, _ in cited_paths(text) if outside(root, token)})


# --- the rules themselves ---------------------------------------------------------------

def test_path_rules_pick_repository_paths_only(tmp_path: Path) -> None:
    (tmp_path / "pipeline" / "simulator").mkdir(parents=True)
    (tmp_path / "pipeline" / "config.py").write_text("")
    (tmp_path / ".gitignore").write_text("bench/results/\n*.pyc\n")
    text = "\n".join([
        "See `pipeline/config.py` and `pipeline/gone.py`, `redis://host:6379/0`,",
        "`GET /fapi/v1/depth`, `raw:market:*`, `bench/results/` and `../shared/SPEC.md`.",
        "",
        "- `pipeline/`: settings (`config.py`), the simulator (`simulator/`)",
        "  and the old one (`sim/`).",
        "- other: `simulator/`",
        "",
        "```sh",
        "cat `not/a/cited.py`",
        "```",
    ])
    assert missing_paths(text, tmp_path) == ["pipeline/gone.py", "sim/", "simulator/"]
    assert leaving_paths(text, tmp_path) == ["../shared/SPEC.md"]


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: p.name)
def test_every_cited_path_is_in_the_tree(doc: Path) -> None:
    missing = missing_paths(doc.read_text())
    assert not missing, f"{doc.name} cites paths that are not in the tree: {missing}"


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: p.name)
def test_docs_cite_nothing_outside_the_repository(doc: Path) -> None:
    leaving = leaving_paths(doc.read_text())
    assert not leaving, f"{doc.name} cites paths a clone does not have: {leaving}"


def test_the_architecture_cites_the_new_layout() -> None:
    cited = {token for token, _ in cited_paths((ROOT / "docs" / "architecture.md").read_text())}
    assert {"projections/shell/loop.py", "projections/core/keys.py",
            "projections/core/outputs.py", "pipeline/redisconn.py",
            "pipeline/backoff.py"} <= cited


# --- the contract's keys are the keys the code builds ------------------------------------

K = Keys("P")
A = Keys("P", account="{account}")  # a labelled account's keys
# Keys method -> the keys it builds, with the contract's placeholders as arguments
BUILT: dict[str, list[str]] = {
    "mark_price": [K.mark_price("{symbol}")],
    "orderbook": [K.orderbook("{symbol}", "{depth}")],
    "kline": [K.kline("{symbol}", "{interval}")],
    "klines": [K.klines("{symbol}", "{interval}")],
    "last_price": [K.last_price("{symbol}")],
    "book_ticker": [K.book_ticker("{symbol}")],
    "position": [k.position("{symbol}", *side) for k in (K, A)
                 for side in ((), ("long",), ("short",))],
    "balance": [K.balance("{asset}"), A.balance("{asset}")],
    "order_state": [k.order_state("{symbol}", kind) for k in (K, A) for kind in ("order", "algo")],
    "open_orders": [k.open_orders("{symbol}", kind) for k in (K, A) for kind in ("order", "algo")],
    "orders_stream": [k.orders_stream(*s) for k in (K, A) for s in ((), ("{symbol}",))],
    "orders_partitions": [s for k in (K, A) for s in k.orders_partitions()],
    "raw_user": [K.raw_user(), A.raw_user()],
    "raw_conn_user": [K.raw_conn_user(), A.raw_conn_user()],
    "account_events": [k.account_events() for k in (K, A)],
    "position_events": [k.position_events() for k in (K, A)],
    "leverage": [k.leverage("{symbol}") for k in (K, A)],
    "multi_assets_margin": [k.multi_assets_margin() for k in (K, A)],
}
# helpers of Keys that build no key of their own (patterns, parsing, argument lists, names)
KEYS_HELPERS = {"view", "view_head", "pattern", "family_of", "parts_of", "held_orders",
                "order_keys", "account_of", "projection"}
OTHER_KEYS = [market_key("{family}"), KEY_OTHER, KEY_USER, KEY_CONN_MARKET, KEY_CONN_USER,
              KEY_DEPTH_SNAPSHOTS, dlq_key("{projection}"),
              lease_key("{projection}")]
_PLACEHOLDER = re.compile(r"\{\w+\}")
_KEY_CELL = re.compile(r"^`((?:P|raw|dlq|lease):[^`]*)`$")


def table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in prose(text).splitlines() if line.lstrip().startswith("|")]


def contract_keys() -> list[str]:
    """The keys in the first column of the contract's tables."""
    out = []
    for row in table_rows(CONTRACT.read_text()):
        m = _KEY_CELL.match(row[0])
        if m:
            out.append(m.group(1))
    return out


def matches(documented: str, built: str) -> bool:
    """`raw:market:kline_{interval}` matches `raw:market:{family}`: a placeholder the code
    fills stands for any one part of the key."""
    doc_parts, built_parts = documented.split(":"), built.split(":")
    return len(doc_parts) == len(built_parts) and all(
        d == b or (_PLACEHOLDER.fullmatch(b) is not None and d != "")
        for d, b in zip(doc_parts, built_parts, strict=True))


def known_family(key: str) -> bool:
    family = key.split(":", 2)[2]
    return family in DEFAULT_RETENTION or family.startswith("kline_")


def test_keys_py_builds_no_key_this_test_does_not_know() -> None:
    builders = {n for n in vars(Keys) if not n.startswith("_") and callable(vars(Keys)[n])}
    assert builders - KEYS_HELPERS == set(BUILT), (
        "projections/core/keys.py builders changed: document the keys in docs/contract.md "
        f"and list them in BUILT: {sorted((builders - KEYS_HELPERS) ^ set(BUILT))}")


def test_every_key_in_the_contract_is_one_the_code_builds() -> None:
    built = [k for ks in BUILT.values() for k in ks] + OTHER_KEYS
    documented = contract_keys()
    assert len(documented) > 20, "the contract's key tables were not found"
    unknown = [d for d in documented if not any(matches(d, b) for b in built)
               or (d.startswith("raw:market:") and not known_family(d))]
    assert not unknown, f"docs/contract.md lists keys keys.py cannot build: {unknown}"


def test_every_key_the_code_builds_is_in_the_contract() -> None:
    documented = contract_keys()
    built = [k for ks in BUILT.values() for k in ks] + OTHER_KEYS
    absent = [b for b in built if not any(matches(d, b) for d in documented)]
    assert not absent, f"keys.py builds keys docs/contract.md does not list: {absent}"


# --- the contract's settings and flags are the ones the commands read --------------------

_VARIABLES_CELL = re.compile(r"`[A-Z][A-Z0-9_]+`(, `[A-Z][A-Z0-9_]+`)*")


def settings_rows() -> dict[str, list[str]]:
    """Rows of the settings table by variable: the first cell names only variables."""
    rows = {}
    for row in table_rows(CONTRACT.read_text()):
        if _VARIABLES_CELL.fullmatch(row[0]):
            for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", row[0]):
                rows[name] = row
    return rows


@pytest.mark.parametrize("variable", sorted(DEFAULTS))
def test_every_setting_is_in_the_contract_with_its_flag_and_default(variable: str) -> None:
    row = settings_rows().get(variable)
    assert row is not None, f"docs/contract.md has no row for {variable}"
    flag = next(f for f, env in COMMON_FLAGS.items() if env == variable)
    assert f"`{flag}`" in row[1], f"{variable}: flag {flag} not in {row[1]!r}"
    default = DEFAULTS[variable]
    assert (f"`{default}`" in row[2]) if default else row[2].startswith("empty"), \
        f"{variable}: default {default!r} not in {row[2]!r}"


def command_flags(module_name: str) -> set[str]:
    parser = argparse.ArgumentParser()
    importlib.import_module(module_name).add_arguments(parser)
    return {opt for action in parser._actions for opt in action.option_strings
            if opt.startswith("--") and opt != "--help"}


def documented_flags() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for row in table_rows(CONTRACT.read_text()):
        if len(row) == 4 and re.fullmatch(r"`[a-z]+( [a-z]+)?`", row[0]):
            flags = set(re.findall(r"`(--[a-z0-9-]+)`", row[1]))
            if flags:
                out.setdefault(row[0].strip("`"), set()).update(flags)
    return out


@pytest.mark.parametrize("words", sorted(COMMANDS), ids=" ".join)
def test_every_command_flag_is_in_the_contract(words: tuple[str, ...]) -> None:
    command = " ".join(words)
    real = command_flags(COMMANDS[words][0])
    written = documented_flags().get(command, set())
    assert real == written, (f"`{command}` flags: in the code, not in docs/contract.md "
                             f"{sorted(real - written)}; in the docs, not in the code "
                             f"{sorted(written - real)}")
