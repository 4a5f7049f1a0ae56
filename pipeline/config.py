"""Settings: from flags and the environment (a flag wins), validated once, at start.

A bad setting raises SettingsError naming it; the CLI prints that one line and exits 2.
Secrets are held in `Secret`, whose repr and str are masked, so a settings object can be logged.

What is refused, so that nothing crashes later or is silently taken (`BOUNDS` for numbers):
- numbers that are not finite (`nan`, `inf`, `1e309`), out of their range, or fractional
  where a count is meant;
- URLs that do not parse (`http://[::1`), have the wrong scheme, no host, a bad port,
  spaces, control or non-ASCII characters; Binance base URLs with a query or fragment; a
  Redis URL whose path is not a database number;
- an API key or secret that is not printable ASCII (a secret may have line breaks: a PEM);
- retention counts or ages that are not > 0;
- a view prefix outside `[A-Za-z0-9_.-]`, the characters the ACL renderer allows, so no glob
  character (`*?[]`) reaches a SCAN pattern and no `:` splits a key name.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path as FsPath
from urllib.parse import urlsplit

import attrs

from pipeline.errors import SettingsError
from pipeline.eventlog import Retention, parse_retention
from pipeline.streams import Shard, StreamKind, parse_shard, parse_stream_kinds, parse_symbols
from projections.core.keys import check_account


@attrs.frozen(repr=False)
class Secret:
    """A value that must never be printed: API key, API secret, listenKey."""

    value: str = attrs.field(repr=False)

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def masked(self) -> str:
        return mask(self.value)


def mask(value: str) -> str:
    """`abcdef...xyz` -> `abcd…(64)`: enough to tell two keys apart, not enough to use one."""
    return f"{value[:4]}…({len(value)})" if value else "<empty>"


# query parameters whose value is a credential: redis-py takes `?password=`, Binance URLs
# carry `listenKey=`, `signature=`, and other services `token=`, `apiKey=`, `secret=`
_SECRET_PARAM = re.compile(r"pass|pwd|token|secret|key|signature|auth|credential", re.I)
_USERINFO = re.compile(r"(//)([^/@?#]*)@")


def redact_url(url: str) -> str:
    """The URL with its password, any credential in its query (listenKey, password=,
    token=, ...) hidden, for logs and errors. Never raises: a URL that does not parse is
    masked the same way, by pattern."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return _redact_text(url)
    netloc = parts.netloc
    if "@" in netloc:
        cred, host = netloc.rsplit("@", 1)
        user = cred.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in cred else f"***@{host}"
    return parts._replace(netloc=netloc, query=_redact_query(parts.query)).geturl()


def _redact_query(query: str) -> str:
    out = []
    for item in query.split("&") if query else ():
        name, sep, _ = item.partition("=")
        out.append(f"{name}=***" if sep and _SECRET_PARAM.search(name) else item)
    return "&".join(out)


def _redact_text(url: str) -> str:
    def userinfo(m: re.Match[str]) -> str:
        user, colon, _ = m.group(2).partition(":")
        return f"{m.group(1)}{user}:***@" if colon else f"{m.group(1)}***@"

    head, sep, query = _USERINFO.sub(userinfo, url).partition("?")
    return head + sep + _redact_query(query.split("#", 1)[0]) if sep else head


DEFAULTS: dict[str, str] = {
    "REDIS_URL": "redis://localhost:6379/0",
    "BINANCE_WS_URL": "wss://fstream.binance.com",
    "BINANCE_REST_URL": "https://fapi.binance.com",
    "PIPELINE_SYMBOLS": "BTCUSDT,ETHUSDT,SOLUSDT",
    "PIPELINE_MARKET_STREAMS": "markPrice@1s,depth20@100ms,aggTrade,kline_1m",
    "PIPELINE_VIEW_PREFIX": "websocket",
    "PIPELINE_RETENTION": "",
    "PIPELINE_SILENCE_TIMEOUT": "30",
    "PIPELINE_ROTATE_AFTER": "85800",  # 23 h 50 min: before the server's 24 h close
    "PIPELINE_BUFFER_FRAMES": "200000",
    "PIPELINE_METRICS_PORT": "0",  # 0: no metrics server
    "PIPELINE_LOG_FORMAT": "text",
    "PIPELINE_REST_WEIGHT_LIMIT": "2400",
    # plausibility bounds of the projector (projections.core.plausible.Bounds has the same
    # defaults; the consumer library imports this module, so not that one):
    "PIPELINE_MAX_CLOCK_AHEAD_S": "10",  # an event time beyond its receipt + this is poison
    "PIPELINE_MAX_ID_RATE": "10000000",  # ids a second a stream can advance (book u, trade a)
    "PIPELINE_REPAIR_SLACK_S": "1",  # event-time slack before a held id is judged impossible
    "PIPELINE_BUFFER_BYTES": "256MiB",
    # several accounts, market shards, listings (own block below)
    "PIPELINE_ACCOUNT": "",  # empty: the unlabelled account, today's keys
    "PIPELINE_ACCOUNTS": "",  # empty: PIPELINE_ACCOUNT alone
    "PIPELINE_SHARD": "",  # empty: one market ingestor covers every symbol
    "PIPELINE_LISTINGS_EVERY": "300",  # with PIPELINE_SYMBOLS=ALL: re-read exchangeInfo
    "PIPELINE_KLINE_HISTORY": "500",  # closed candles from REST per kline stream; 0: none
    "PIPELINE_EVENTS_MAX_AGE_S": "604800",  # P:account_events, P:position_events: 7 days
    # Redis Cluster: empty = as the node in REDIS_URL says (INFO cluster); 1/0 must agree
    "PIPELINE_REDIS_CLUSTER": "",
    "PIPELINE_USER_WAIT_MS": "1000",  # cluster mode: WAIT 1 <ms> after raw:user appends
}


@attrs.frozen
class Settings:
    redis_url: str
    ws_url: str
    rest_url: str
    symbols: tuple[str, ...] | None  # None: ALL, resolved from exchangeInfo
    market_streams: tuple[StreamKind, ...]
    view_prefix: str
    retention: Mapping[str, Retention]
    silence_timeout: float
    rotate_after: float
    buffer_frames: int
    metrics_port: int
    log_format: str
    api_key: Secret | None = None
    api_secret: Secret | None = None
    rest_weight_limit: int = 2400
    max_clock_ahead_s: float = 10.0
    max_id_rate: float = 10_000_000.0
    repair_slack_s: float = 1.0
    buffer_bytes: int = 256 * 1024 * 1024
    account: str | None = None  # this process's account label (`ingest user`, a reader)
    # the accounts a projector serves and `pipeline status` expects; None: the unlabelled one
    accounts: tuple[str | None, ...] = (None,)
    shard: Shard | None = None  # this market ingestor's part of the symbols; None: all
    listings_every: float = 300.0
    kline_history: int = 500
    events_max_age_s: float = 604_800.0
    redis_cluster: bool | None = None  # None: as the node in REDIS_URL says
    user_wait_ms: int = 1000  # cluster mode: a replica's acknowledgement of raw:user appends

    def require_api_key(self) -> tuple[Secret, Secret]:
        if self.api_key is None:
            raise SettingsError("BINANCE_API_KEY",
                                "is required for `ingest user` (or BINANCE_API_KEY_FILE)")
        if self.api_secret is None:
            raise SettingsError(
                "BINANCE_API_SECRET", "is required for `ingest user` (or BINANCE_API_SECRET_FILE)")
        return self.api_key, self.api_secret


def _url(name: str, value: str, schemes: tuple[str, ...]) -> str:
    shown = repr(redact_url(value))
    if not value.isascii() or any(c.isspace() or not c.isprintable() for c in value):
        raise SettingsError(name, f"{shown} has spaces, control or non-ASCII characters")
    try:
        parts = urlsplit(value)
        port = parts.port  # raises on a malformed or out-of-range port
    except ValueError as exc:
        raise SettingsError(name, f"{shown} is malformed: {exc}") from None
    if parts.scheme == "unix" and "unix" in schemes and parts.path and not parts.netloc:
        return value  # unix:///run/redis.sock: a socket path, no host or port
    if parts.scheme not in schemes or not parts.hostname:
        raise SettingsError(name, f"{shown} is not a {'/'.join(schemes)} URL with a host")
    if port == 0:
        raise SettingsError(name, f"{shown}: port 0")
    if parts.fragment:
        raise SettingsError(name, f"{shown} has a fragment (#...)")
    if name == "REDIS_URL":
        if parts.path.strip("/") and not parts.path.strip("/").isdigit():
            raise SettingsError(name, f"{shown}: the path must be a database number (/0)")
        return value
    if parts.query:
        raise SettingsError(name, f"{shown} is a base URL: no query (?...)")
    return value.rstrip("/")


@attrs.frozen
class Bound:
    low: float
    high: float
    integer: bool = False
    why: str = ""


# every numeric setting: its range, and whether it counts something
BOUNDS: dict[str, Bound] = {
    "PIPELINE_SILENCE_TIMEOUT": Bound(0.05, 3600.0),
    # Binance closes every connection at 24 h: the new one must be open before that
    "PIPELINE_ROTATE_AFTER": Bound(0.1, 86_340.0, why="Binance closes a connection at 24 h"),
    "PIPELINE_BUFFER_FRAMES": Bound(1, 10_000_000, integer=True),
    "PIPELINE_METRICS_PORT": Bound(0, 65_535, integer=True, why="0: no metrics server"),
    # the projector's plausibility bounds (projections.core.plausible)
    "PIPELINE_MAX_CLOCK_AHEAD_S": Bound(0.001, 86_400.0),
    "PIPELINE_MAX_ID_RATE": Bound(1, 1e15),
    "PIPELINE_REPAIR_SLACK_S": Bound(0, 3600.0),
    # exchangeInfo weighs 1: once a second at most is still far below any budget
    "PIPELINE_LISTINGS_EVERY": Bound(1.0, 86_400.0),
    # GET /fapi/v1/klines answers at most 1500 rows, the last of them the open candle
    "PIPELINE_KLINE_HISTORY": Bound(0, 1499, integer=True, why="0: no history from REST"),
    "PIPELINE_EVENTS_MAX_AGE_S": Bound(60, 10 * 365 * 86_400.0),
    "PIPELINE_USER_WAIT_MS": Bound(0, 60_000, integer=True, why="0: no WAIT"),
}


def number(name: str, value: str, bound: Bound) -> float:
    """`value` as a finite number in `bound`, else a SettingsError naming `name`."""
    try:
        n = float(value)
    except (TypeError, ValueError):
        raise SettingsError(name, f"{value!r} is not a number") from None
    if not math.isfinite(n):
        raise SettingsError(name, f"{value!r} is not a finite number")
    if bound.integer and not n.is_integer():
        raise SettingsError(name, f"{value!r} is not a whole number")
    if not bound.low <= n <= bound.high:
        why = f" ({bound.why})" if bound.why else ""
        raise SettingsError(name, f"{value!r} is not between {bound.low:g} and "
                                  f"{bound.high:g}{why}")
    return n


def _number(name: str, merged: Mapping[str, str]) -> float:
    return number(name, merged[name], BOUNDS[name])


def _printable(name: str, value: str, *, pem: bool = False) -> str:
    """An API key or secret goes into HTTP headers and signatures: printable ASCII, no space
    (a secret may be a PEM: spaces and line breaks too). The message says where, never what."""
    allowed = (lambda c: " " <= c <= "~" or c in "\r\n") if pem else (lambda c: "!" <= c <= "~")
    bad = next((i for i, c in enumerate(value, start=1) if not allowed(c)), None)
    if bad is not None:
        kind = "printable ASCII" if pem else "printable ASCII without spaces"
        raise SettingsError(name, f"must be {kind} (character {bad} is not)")
    return value


def _retention(value: str) -> dict[str, Retention]:
    out = parse_retention(value)
    for family, kept in out.items():
        if kept.maxlen is not None and not 1 <= kept.maxlen <= MAX_RETAINED:
            raise SettingsError("PIPELINE_RETENTION", f"{family}={kept.maxlen}: a count must "
                                                      f"be between 1 and {MAX_RETAINED}")
        age = kept.max_age_s
        if age is not None and not (math.isfinite(age) and 0 < age <= MAX_AGE_S):
            raise SettingsError("PIPELINE_RETENTION", f"{family}=age:{age:g}: an age must be "
                                                      f"> 0 and at most {MAX_AGE_S:g} s")
    return out


MAX_RETAINED = 10**12  # entries; more than any Redis holds
MAX_AGE_S = 10 * 365 * 86_400.0  # ten years: `now - age` stays a valid stream id
_PREFIX = re.compile(r"[A-Za-z0-9_.-]+")


def _secret(env: Mapping[str, str], name: str) -> Secret | None:
    pem = name == "BINANCE_API_SECRET"
    if env.get(name):
        return Secret(_printable(name, env[name].strip(), pem=pem))
    path = env.get(f"{name}_FILE")
    if path:
        try:
            text = FsPath(path).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise SettingsError(f"{name}_FILE", f"cannot read {path!r}: {why}") from None
        if not text:
            raise SettingsError(f"{name}_FILE", f"{path!r} is empty")
        return Secret(_printable(f"{name}_FILE", text, pem=pem))
    return None


def load_settings(
    overrides: Mapping[str, str | None] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Build Settings from `env` (default: os.environ) with `overrides` (from flags) on top.

    Both are keyed by the variable names of the SPEC (`REDIS_URL`, `PIPELINE_SYMBOLS`, ...).
    """
    merged: dict[str, str] = dict(DEFAULTS)
    source = os.environ if env is None else env
    merged.update({k: v for k, v in source.items() if k in DEFAULTS or k.startswith("BINANCE_")})
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})

    prefix = merged["PIPELINE_VIEW_PREFIX"].strip()
    if not _PREFIX.fullmatch(prefix):
        raise SettingsError("PIPELINE_VIEW_PREFIX",
                            f"{prefix!r} must be a word of [A-Za-z0-9_.-], as the ACL allows")
    log_format = merged["PIPELINE_LOG_FORMAT"]
    if log_format not in ("text", "json"):
        raise SettingsError("PIPELINE_LOG_FORMAT", f"{log_format!r} is not text or json")
    account = account_label("PIPELINE_ACCOUNT", merged["PIPELINE_ACCOUNT"])
    return Settings(
        redis_url=_url("REDIS_URL", merged["REDIS_URL"], ("redis", "rediss", "unix")),
        ws_url=_url("BINANCE_WS_URL", merged["BINANCE_WS_URL"], ("ws", "wss")),
        rest_url=_url("BINANCE_REST_URL", merged["BINANCE_REST_URL"], ("http", "https")),
        symbols=parse_symbols(merged["PIPELINE_SYMBOLS"]),
        market_streams=parse_stream_kinds(merged["PIPELINE_MARKET_STREAMS"]),
        view_prefix=prefix,
        retention=_retention(merged["PIPELINE_RETENTION"]),
        silence_timeout=_number("PIPELINE_SILENCE_TIMEOUT", merged),
        rotate_after=_number("PIPELINE_ROTATE_AFTER", merged),
        buffer_frames=int(_number("PIPELINE_BUFFER_FRAMES", merged)),
        metrics_port=int(_number("PIPELINE_METRICS_PORT", merged)),
        log_format=log_format,
        api_key=_secret(merged, "BINANCE_API_KEY"),
        api_secret=_secret(merged, "BINANCE_API_SECRET"),
        rest_weight_limit=rest_weight_limit(merged["PIPELINE_REST_WEIGHT_LIMIT"]),
        max_clock_ahead_s=_number("PIPELINE_MAX_CLOCK_AHEAD_S", merged),
        max_id_rate=_number("PIPELINE_MAX_ID_RATE", merged),
        repair_slack_s=_number("PIPELINE_REPAIR_SLACK_S", merged),
        buffer_bytes=buffer_bytes(merged["PIPELINE_BUFFER_BYTES"]),
        account=account,
        accounts=account_labels(merged["PIPELINE_ACCOUNTS"], account),
        shard=parse_shard(merged["PIPELINE_SHARD"]),
        listings_every=_number("PIPELINE_LISTINGS_EVERY", merged),
        kline_history=int(_number("PIPELINE_KLINE_HISTORY", merged)),
        events_max_age_s=_number("PIPELINE_EVENTS_MAX_AGE_S", merged),
        redis_cluster=parse_cluster(merged["PIPELINE_REDIS_CLUSTER"]),
        user_wait_ms=int(_number("PIPELINE_USER_WAIT_MS", merged)),
    )


def parse_cluster(value: str) -> bool | None:
    """PIPELINE_REDIS_CLUSTER: `1`/`true`/`yes` cluster, `0`/`false`/`no` one node, empty:
    as the node in REDIS_URL says."""
    v = value.strip().lower()
    if v == "":
        return None
    if v in ("1", "true", "yes"):
        return True
    if v in ("0", "false", "no"):
        return False
    raise SettingsError("PIPELINE_REDIS_CLUSTER", f"{value[:20]!r} is not 1 or 0 (or empty)")


# --- several accounts, market shards, listings --------------------------------------------------
# PIPELINE_ACCOUNT labels one account's keys (`projections.core.keys`: raw:user:{label},
# P:acct:{label}:...); PIPELINE_ACCOUNTS lists every label of the deployment, for the projector
# (which serves each), `pipeline status` (which expects each) and the ACL renderer (a user pair
# each); `-` in it names the unlabelled account. PIPELINE_SHARD=i/n takes shard i of n of the
# symbols (`pipeline.streams.Shard`).
UNLABELLED = "-"


def account_label(name: str, value: str) -> str | None:
    text = value.strip()
    if not text:
        return None
    try:
        return check_account(text)
    except ValueError as exc:
        raise SettingsError(name, str(exc)) from None


def account_labels(value: str, single: str | None) -> tuple[str | None, ...]:
    """PIPELINE_ACCOUNTS as a tuple of labels (None: the unlabelled account); unset: the one
    account of PIPELINE_ACCOUNT."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        return (single,)
    labels = [None if v == UNLABELLED else account_label("PIPELINE_ACCOUNTS", v) for v in items]
    return tuple(dict.fromkeys(labels))



# --- the REST weight budget -------------------------------------------------------------------
# Binance allows 2400 a minute per IP, and since 2026-06-30 COIN-M calls from the same IP
# spend the same budget: a host that also trades COIN-M gives this process less.
MAX_REST_WEIGHT_LIMIT = 2400


def rest_weight_limit(value: str) -> int:
    """PIPELINE_REST_WEIGHT_LIMIT: the weight a minute this process may plan with, 1..2400."""
    try:
        limit = int(value.strip())
    except ValueError:
        raise SettingsError("PIPELINE_REST_WEIGHT_LIMIT", f"{value!r} is not a whole number"
                            ) from None
    if not 1 <= limit <= MAX_REST_WEIGHT_LIMIT:
        raise SettingsError("PIPELINE_REST_WEIGHT_LIMIT",
                            f"{limit} is not between 1 and {MAX_REST_WEIGHT_LIMIT} (Binance's "
                            "limit per IP)")
    return limit


# --- the ingest buffer's byte bound -------------------------------------------------------------
# Next to PIPELINE_BUFFER_FRAMES: the first bound reached drops. Below the floor the largest
# frame a connection accepts (4 Mi characters of text, 16 MiB at most as UTF-8) might never fit.
MIN_BUFFER_BYTES = 32 * 1024 * 1024
_BYTE_UNITS = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "": 1}


def buffer_bytes(value: str) -> int:
    """PIPELINE_BUFFER_BYTES: `268435456`, `256MiB`, `1GiB`, `65536KiB`; at least 32 MiB."""
    text = value.strip()
    unit = next(u for u in _BYTE_UNITS if text.endswith(u))
    try:
        n = int(text[:len(text) - len(unit)].strip()) * _BYTE_UNITS[unit]
    except ValueError:
        raise SettingsError("PIPELINE_BUFFER_BYTES",
                            f"{value!r} is not a number of bytes (e.g. 256MiB)") from None
    if n < MIN_BUFFER_BYTES:
        raise SettingsError("PIPELINE_BUFFER_BYTES", f"{value!r} is below 32MiB")
    return n
