"""Settings: from flags and the environment (a flag wins), validated once, at start.

A bad setting raises SettingsError naming it; the CLI prints that one line and exits 2.
Secrets are held in `Secret`, whose repr and str are masked, so a settings object can be logged.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path as FsPath
from urllib.parse import urlsplit

import attrs

from pipeline.errors import SettingsError
from pipeline.eventlog import Retention, parse_retention
from pipeline.streams import StreamKind, parse_stream_kinds, parse_symbols


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


def redact_url(url: str) -> str:
    """The URL with its password (and any listenKey) hidden, for logs and errors."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        cred, host = netloc.rsplit("@", 1)
        user = cred.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in cred else f"***@{host}"
    query = parts.query
    if "listenKey=" in query:
        query = "&".join(
            "listenKey=***" if q.startswith("listenKey=") else q for q in query.split("&")
        )
    return parts._replace(netloc=netloc, query=query).geturl()


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

    def require_api_key(self) -> tuple[Secret, Secret]:
        if self.api_key is None:
            raise SettingsError("BINANCE_API_KEY",
                                "is required for `ingest user` (or BINANCE_API_KEY_FILE)")
        if self.api_secret is None:
            raise SettingsError(
                "BINANCE_API_SECRET", "is required for `ingest user` (or BINANCE_API_SECRET_FILE)")
        return self.api_key, self.api_secret


def _url(name: str, value: str, schemes: tuple[str, ...]) -> str:
    parts = urlsplit(value)
    if parts.scheme == "unix" and "unix" in schemes and parts.path:
        return value  # unix:///run/redis.sock: a socket path, no host or port
    if parts.scheme not in schemes or not parts.hostname:
        raise SettingsError(name, f"{redact_url(value)!r} is not a {'/'.join(schemes)} URL")
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise SettingsError(name, f"{redact_url(value)!r} has a malformed port") from None
    return value.rstrip("/") if name != "REDIS_URL" else value


def _number(name: str, value: str, *, minimum: float = 0) -> float:
    try:
        n = float(value)
    except ValueError:
        raise SettingsError(name, f"{value!r} is not a number") from None
    if n < minimum:
        raise SettingsError(name, f"{value!r} is below {minimum:g}")
    return n


def _secret(env: Mapping[str, str], name: str) -> Secret | None:
    if env.get(name):
        return Secret(env[name].strip())
    path = env.get(f"{name}_FILE")
    if path:
        try:
            text = FsPath(path).read_text().strip()
        except OSError as exc:
            raise SettingsError(f"{name}_FILE", f"cannot read {path!r}: {exc.strerror}") from None
        if not text:
            raise SettingsError(f"{name}_FILE", f"{path!r} is empty")
        return Secret(text)
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
    if not prefix or any(c in prefix for c in " :*?"):
        raise SettingsError("PIPELINE_VIEW_PREFIX", f"{prefix!r} must be a non-empty word")
    log_format = merged["PIPELINE_LOG_FORMAT"]
    if log_format not in ("text", "json"):
        raise SettingsError("PIPELINE_LOG_FORMAT", f"{log_format!r} is not text or json")
    return Settings(
        redis_url=_url("REDIS_URL", merged["REDIS_URL"], ("redis", "rediss", "unix")),
        ws_url=_url("BINANCE_WS_URL", merged["BINANCE_WS_URL"], ("ws", "wss")),
        rest_url=_url("BINANCE_REST_URL", merged["BINANCE_REST_URL"], ("http", "https")),
        symbols=parse_symbols(merged["PIPELINE_SYMBOLS"]),
        market_streams=parse_stream_kinds(merged["PIPELINE_MARKET_STREAMS"]),
        view_prefix=prefix,
        retention=parse_retention(merged["PIPELINE_RETENTION"]),
        silence_timeout=_number("PIPELINE_SILENCE_TIMEOUT", merged["PIPELINE_SILENCE_TIMEOUT"],
                                minimum=0.05),
        rotate_after=_number("PIPELINE_ROTATE_AFTER", merged["PIPELINE_ROTATE_AFTER"], minimum=0.1),
        buffer_frames=int(_number("PIPELINE_BUFFER_FRAMES", merged["PIPELINE_BUFFER_FRAMES"],
                                  minimum=1)),
        metrics_port=int(_number("PIPELINE_METRICS_PORT", merged["PIPELINE_METRICS_PORT"])),
        log_format=log_format,
        api_key=_secret(merged, "BINANCE_API_KEY"),
        api_secret=_secret(merged, "BINANCE_API_SECRET"),
        rest_weight_limit=rest_weight_limit(merged["PIPELINE_REST_WEIGHT_LIMIT"]),
        max_clock_ahead_s=_number("PIPELINE_MAX_CLOCK_AHEAD_S",
                                  merged["PIPELINE_MAX_CLOCK_AHEAD_S"], minimum=0.001),
        max_id_rate=_number("PIPELINE_MAX_ID_RATE", merged["PIPELINE_MAX_ID_RATE"], minimum=1),
        repair_slack_s=_number("PIPELINE_REPAIR_SLACK_S", merged["PIPELINE_REPAIR_SLACK_S"]),
    )


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
