"""`pipeline` command line: one subcommand per process role (contract: docs/contract.md).

Each role lives in its own module exposing `add_arguments(parser)` and
`main(settings, args) -> int`. Only the module of the command named on the command line is
imported, and its flags are added before anything is parsed, so `pipeline <command> --help`
shows them and a broken role cannot stop the others from starting. A SettingsError anywhere
during start-up, or a flag argparse refuses (a float flag that is not finite included),
prints one line naming the setting and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from pipeline.config import load_settings
from pipeline.errors import SettingsError
from pipeline.logs import escape, register_secret, scrub, setup_logging

# command -> module holding add_arguments() and main()
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("ingest", "market"): ("pipeline.ingest_market", "market-data ingestor"),
    ("ingest", "user"): ("pipeline.ingest_user", "user-data ingestor"),
    ("project",): ("projections.shell.project", "run the projector consumer groups"),
    ("functions", "load"): ("projections.shell.functions", "load the projector's Redis functions"),
    ("replay",): ("projections.shell.replay", "rebuild views from the log, then exit"),
    ("status",): ("pipeline.status", "connections, streams, lag, view ages, dead letters"),
    ("simulate",): ("pipeline.simulator.server", "local Binance-protocol exchange simulator"),
    ("demo",): ("pipeline.demo", "the whole system on one machine, no account needed"),
}

# flag -> environment variable it overrides
COMMON_FLAGS: dict[str, str] = {
    "--redis-url": "REDIS_URL",
    "--ws-url": "BINANCE_WS_URL",
    "--rest-url": "BINANCE_REST_URL",
    "--symbols": "PIPELINE_SYMBOLS",
    "--streams": "PIPELINE_MARKET_STREAMS",
    "--view-prefix": "PIPELINE_VIEW_PREFIX",
    "--retention": "PIPELINE_RETENTION",
    "--silence-timeout": "PIPELINE_SILENCE_TIMEOUT",
    "--rotate-after": "PIPELINE_ROTATE_AFTER",
    "--buffer-frames": "PIPELINE_BUFFER_FRAMES",
    "--buffer-bytes": "PIPELINE_BUFFER_BYTES",
    "--metrics-port": "PIPELINE_METRICS_PORT",
    "--log-format": "PIPELINE_LOG_FORMAT",
    "--rest-weight-limit": "PIPELINE_REST_WEIGHT_LIMIT",
    "--max-clock-ahead": "PIPELINE_MAX_CLOCK_AHEAD_S",
    "--max-id-rate": "PIPELINE_MAX_ID_RATE",
    "--repair-slack": "PIPELINE_REPAIR_SLACK_S",
    # `--account` is `pipeline simulate`'s own (its accounts' credentials): an abbreviation of
    # this one everywhere else
    "--account-label": "PIPELINE_ACCOUNT",
    "--all-accounts": "PIPELINE_ACCOUNTS",
    "--shard": "PIPELINE_SHARD",
    "--listings-every": "PIPELINE_LISTINGS_EVERY",
    "--kline-history": "PIPELINE_KLINE_HISTORY",
    "--events-max-age": "PIPELINE_EVENTS_MAX_AGE_S",
    "--redis-cluster": "PIPELINE_REDIS_CLUSTER",
    "--user-wait-ms": "PIPELINE_USER_WAIT_MS",
}


def finite_float(text: str) -> float:
    """Every `type=float` flag of every command: `nan`, `inf` and `1e309` are refused."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with the project's rules: a bad flag is one line naming it and exit 2 (not
    the usage text), and float flags must be finite. Subcommand parsers are of this class
    too (argparse makes them of their parent's class)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register("type", float, finite_float)

    def error(self, message: str) -> NoReturn:
        print(f"pipeline: bad setting {escape(message)}", file=sys.stderr)
        sys.exit(2)


def _add_common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (a flag wins over its environment variable)")
    for flag, env in COMMON_FLAGS.items():
        group.add_argument(flag, dest=env, default=None, help=f"overrides ${env}")


def command_of(argv: Sequence[str]) -> tuple[str, ...] | None:
    """The command words `argv` starts with (`("ingest", "user")`), or None when it names none.

    Every flag comes after the command words (the top level and `ingest` take no flag but
    --help), so the words are a prefix of argv."""
    for words in COMMANDS:
        if tuple(argv[:len(words)]) == words:
            return words
    return None


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """Every command with the common flags; the command `argv` names also gets its own
    (its module is imported for that)."""
    parser = _Parser(
        prog="pipeline", description=__doc__.splitlines()[0],
        epilog="`pipeline <command> --help` lists a command's flags. Contract: docs/contract.md;"
               " how it is built: docs/architecture.md.")
    sub = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    chosen = command_of(argv)
    for words, (module_name, help_text) in COMMANDS.items():
        if len(words) == 1:
            p = sub.add_parser(words[0], help=help_text, description=help_text)
        else:
            if words[0] not in groups:
                g = sub.add_parser(words[0], help=f"{words[0]} roles")
                groups[words[0]] = g.add_subparsers(dest="role", required=True)
            p = groups[words[0]].add_parser(words[1], help=help_text, description=help_text)
        _add_common(p)
        if words == chosen:
            importlib.import_module(module_name).add_arguments(p)
        p.set_defaults(_module=module_name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    module = importlib.import_module(args._module)
    overrides = {env: getattr(args, env) for env in COMMON_FLAGS.values()}
    try:
        settings = load_settings(overrides)
        setup_logging(settings.log_format)
        for secret in (settings.api_key, settings.api_secret):
            if secret is not None:
                register_secret(secret.value)
        return int(module.main(settings, args) or 0)
    except SettingsError as exc:  # may quote the exchange or a setting: kept to one line
        print(f"pipeline: bad setting {escape(scrub(str(exc)))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        logging.getLogger("pipeline").info("interrupted")
        return 130

