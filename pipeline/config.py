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
    "PIPELINE_BUFFER_BYTES": "256MiB",
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
    buffer_bytes: int = 256 * 1024 * 1024

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
        buffer_bytes=buffer_bytes(merged["PIPELINE_BUFFER_BYTES"]),
    )


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
