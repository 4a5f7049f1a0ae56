"""What a value a view may hold, and how far ahead a version may be. Pure: no trio, no redis.

A view is written only by a newer version, so one frame whose version is absurd would hold
the view for ever (a closed candle opening in 2100 heads `P:klines` and every real candle is
older), and one whose value is not what Binance sends would be served as a fact (`"p": null`).
Every fold therefore checks what it stores, in these terms:

- prices and quantities are decimal strings as Binance writes them (`-?digits[.digits]`, at
  most 32 digits on each side); a book level is a list of two of them, a book side at most
  `MAX_LEVELS` levels;
- times and ids are integers; ids lie in [0, 2^53): Lua, which compares versions in the store,
  has only doubles, and above 2^53 two ids can compare equal;
- an event time (and any time a view is versioned by) lies in (0, recv + max_ahead], where
  recv is the receipt time of the log entry that carried it. Compared with the entry's own
  `recv_ts`, not with the clock, so a replay judges every entry exactly as the live run did;
- a symbol is `[A-Z0-9]{1,32}` with an optional `_YYMMDD` (delivery contracts): nothing that
  can put a glob, a `:` or a huge name into a key. An asset is `[A-Z0-9]{1,20}`.

The store (projections/shell/lua/views.lua) adds the two rules that need the held view: an id
that jumps further past the held one than `max_id_rate` ids a second could carry it is refused
(and its entry dead-lettered), and a held view whose event time is ahead of the server's clock
by more than `max_ahead_ms`, or whose version is ahead while a newer event (by event time,
beyond `repair_slack_ms`) brings a lower one, is overwritten instead of obeyed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import orjson

MAX_SAFE_ID = 2**53
MAX_LEVELS = 5_000  # a REST snapshot has at most 1000 a side; a diff event far fewer

DEFAULT_MAX_AHEAD_S = 10.0
DEFAULT_MAX_ID_RATE = 10_000_000.0
DEFAULT_REPAIR_SLACK_S = 1.0

_DIGITS = r"-?\d{1,32}+(?:\.\d{1,32}+)?+"
DECIMAL_RE = re.compile(_DIGITS + r"\Z")
SYMBOL_RE = re.compile(r"[A-Z0-9]{1,32}+(?:_[0-9]{6})?+\Z")
ASSET_RE = re.compile(r"[A-Z0-9]{1,20}+\Z")

# Byte patterns over the JSON a fold builds (orjson output): a decimal string, a book side.
DECIMAL_JSON = rb'"' + _DIGITS.encode() + rb'"'
_LEVEL_JSON = rb"\[" + DECIMAL_JSON + rb"," + DECIMAL_JSON + rb"\]"
LEVELS_JSON = rb"\[(?:" + _LEVEL_JSON + rb"(?:," + _LEVEL_JSON + rb"){0,%d}+)?+\]" % (
    MAX_LEVELS - 1)
_LEVELS_RE = re.compile(LEVELS_JSON + rb"\Z")


@attrs.frozen
class Bounds:
    """The plausibility bounds of one deployment (Settings: `PIPELINE_MAX_CLOCK_AHEAD_S`,
    `PIPELINE_MAX_ID_RATE`, `PIPELINE_REPAIR_SLACK_S`)."""

    max_ahead_ms: int = int(DEFAULT_MAX_AHEAD_S * 1000)
    max_id_rate: float = DEFAULT_MAX_ID_RATE  # ids a second a stream can plausibly advance
    repair_slack_ms: int = int(DEFAULT_REPAIR_SLACK_S * 1000)

    def time_limit_ms(self, recv_ts: float) -> int:
        """The latest plausible time of an entry received at `recv_ts` (unix seconds)."""
        return int(recv_ts * 1000) + self.max_ahead_ms

    def id_jump_ok(self, held_id: int, held_ms: int, new_id: int, new_ms: int) -> bool:
        """Could a stream have advanced from `held_id` to `new_id` in the event time between?
        (The store applies the same rule to the views it holds.)"""
        dt_s = max(new_ms - held_ms, 0) / 1000
        return new_id - held_id <= self.max_id_rate * (dt_s + 1)


def is_decimal(value: Any) -> bool:
    return type(value) is str and DECIMAL_RE.match(value) is not None


def is_id(value: Any) -> bool:
    return type(value) is int and 0 <= value < MAX_SAFE_ID


def is_time(value: Any, limit_ms: int) -> bool:
    """An integer time in ms after the epoch and no later than `limit_ms`."""
    return type(value) is int and 0 < value <= limit_ms


def is_symbol(value: Any) -> bool:
    return type(value) is str and SYMBOL_RE.match(value) is not None


def is_asset(value: Any) -> bool:
    return type(value) is str and ASSET_RE.match(value) is not None


def levels_ok(raw: Any) -> bool:
    """`[[price, qty], ...]`: at most MAX_LEVELS pairs of decimal strings. One regex over the
    list's JSON: per-level type checks cost four times as much on a 20-level book."""
    return type(raw) is list and len(raw) <= MAX_LEVELS and \
        _LEVELS_RE.match(orjson.dumps(raw)) is not None


def bad_field(event: str, fields: dict[str, Any]) -> str:
    """Why a value a view would store is refused: the first field that is not a decimal
    string (the slow path, run only once a fast check failed)."""
    for name, value in fields.items():
        if not is_decimal(value):
            return f"{event}: {name} is not a decimal string: {value!r}"[:120]
    return f"{event}: a value is not what Binance sends"


Fields = Iterable[tuple[str, Any]]


def check_fields(event: str, limit_ms: int, *, symbols: Fields = (), assets: Fields = (),
                 ids: Fields = (), times: Fields = (), counts: Fields = (),
                 decimals: Fields = ()) -> str | None:
    """The first reason the named values are not what Binance sends, or None: `times` in
    (0, limit_ms], `ids` and `counts` integers in [0, 2^53) (a count or an optional time may be
    0), `decimals` decimal strings. For the user-data folds, which see few events."""
    for name, value in symbols:
        if not is_symbol(value):
            return f"{event}: {name} {str(value)[:40]!r} is not a symbol"
    for name, value in assets:
        if not is_asset(value):
            return f"{event}: {name} {str(value)[:40]!r} is not an asset"
    for name, value in (*ids, *counts):
        if not is_id(value):
            return f"{event}: {name} {str(value)[:40]!r} is not an integer in [0, 2^53)"
    for name, value in times:
        if not is_time(value, limit_ms):
            return (f"{event}: {name} {str(value)[:40]!r} is not a time up to the receipt time "
                    "+ PIPELINE_MAX_CLOCK_AHEAD_S")
    for name, value in decimals:
        if not is_decimal(value):
            return f"{event}: {name} {str(value)[:40]!r} is not a decimal string"
    return None


def present(fields: Mapping[str, Any], names: Iterable[str]) -> list[tuple[str, Any]]:
    """(name, value) of each of `names` that `fields` holds."""
    return [(n, fields[n]) for n in names if n in fields]
