"""`pipeline --help` and `pipeline <command> --help`, run as a newcomer runs them."""

from __future__ import annotations

import argparse
import importlib

import pytest

from pipeline.cli import COMMANDS, COMMON_FLAGS
from tests.conftest import ROOT, run_cli


def own_flags(module_name: str) -> list[str]:
    """The flags a command's module adds on top of the common ones."""
    parser = argparse.ArgumentParser(add_help=False)
    importlib.import_module(module_name).add_arguments(parser)
    return [flag for action in parser._actions for flag in action.option_strings]


@pytest.mark.parametrize("words", list(COMMANDS), ids=" ".join)
def test_command_help_lists_its_own_flags_and_the_common_ones(words: tuple[str, ...]) -> None:
    done = run_cli(*words, "--help", timeout=30)
    assert done.returncode == 0, done.stderr
    flags = own_flags(COMMANDS[words][0])
    # every command but the one-shot `functions load` (REDIS_URL only) has flags of its own
    assert flags or words == ("functions", "load"), f"{' '.join(words)} shows no flag of its own"
    for flag in [*flags, *COMMON_FLAGS]:
        assert flag in done.stdout, f"`pipeline {' '.join(words)} --help` does not list {flag}"


@pytest.mark.parametrize(("words", "flags"), [
    (("status",), ["--json", "--max-lag"]),
    (("replay",), ["--from", "--reset", "--only"]),
    (("project",), ["--only", "--consumer"]),
    (("demo",), ["--seconds"]),
])
def test_the_flags_a_newcomer_looked_for_are_in_the_help(words: tuple[str, ...],
                                                         flags: list[str]) -> None:
    out = run_cli(*words, "--help", timeout=30).stdout
    assert all(f in out for f in flags), out


def test_top_level_help_points_to_docs_a_clone_has() -> None:
    done = run_cli("--help", timeout=30)
    assert done.returncode == 0, done.stderr
    assert "docs/contract.md" in done.stdout and "../shared" not in done.stdout
    assert all(words[0] in done.stdout for words in COMMANDS)
    assert "../shared" not in (ROOT / "pipeline" / "cli.py").read_text()


def test_an_unknown_flag_is_refused_with_exit_2() -> None:
    done = run_cli("status", "--no-such-flag", timeout=30)
    assert done.returncode == 2
    assert "--no-such-flag" in done.stderr
