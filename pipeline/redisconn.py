"""The one place a Redis client is made and redis-py's errors become ours.

Settings that bite under Trio (redis-py's asyncio client does not run on Trio, so the
ingestor and projectors use the sync client from worker threads):
- `socket_timeout` (10 s) is longer than any BLOCK this project issues (`MAX_BLOCK_MS`), so a
  blocking XREADGROUP never looks like a dead server;
- no automatic retry: redis-py would re-send an `XADD *` after a timeout and log the frame twice;
  the writer retries whole batches itself (see `pipeline.eventlog` for what a duplicate is);
- RESP2 and legacy response shapes, so XREADGROUP/XAUTOCLAIM replies keep one shape across
  redis-py upgrades; bytes in, bytes out (`decode_responses=False`): frames stay exact.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from pipeline.config import redact_url
from pipeline.errors import RedisRefused, RedisUnavailable, SettingsError

SOCKET_TIMEOUT_S = 10.0
MAX_BLOCK_MS = 2_000


def make_client(url: str, *, name: str = "pipeline",
                socket_timeout: float = SOCKET_TIMEOUT_S) -> redis.Redis:
    """A client with the pinned settings above. Does not connect yet. (`socket_timeout`:
    tests of a frozen server shorten it; it must stay above `MAX_BLOCK_MS`.)"""
    return redis.Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=5.0,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        protocol=2,
        legacy_responses=True,
        decode_responses=False,
        health_check_interval=0,
        client_name=name,
    )


# redis-py turns some error codes into classes (and drops the code from the text), not others.
_CODES_OF_CLASSES: tuple[tuple[type[Exception], str], ...] = (
    (redis.exceptions.OutOfMemoryError, "OOM"),
    (redis.exceptions.ReadOnlyError, "READONLY"),
    (redis.exceptions.BusyLoadingError, "LOADING"),
    (redis.exceptions.NoPermissionError, "NOPERM"),
    (redis.exceptions.MasterDownError, "MASTERDOWN"),
    (redis.exceptions.TryAgainError, "TRYAGAIN"),
    (redis.exceptions.NoScriptError, "NOSCRIPT"),
    (redis.exceptions.ExecAbortError, "EXECABORT"),
)
# Refusals a later attempt can get past: out of memory, a replica, loading, a script running,
# an ACL being fixed, a failed background save.
REFUSED_FOR_NOW = frozenset(("OOM", "READONLY", "LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN",
                             "NOPERM", "MISCONF"))
# Of those, the ones that refuse every write to the server, not one key or one ACL rule: waiting
# them out costs no other key anything, since nothing else gets in either.
SERVER_REFUSALS = REFUSED_FOR_NOW - {"NOPERM"}


def reply_code(message: str) -> str:
    """The code of an error reply from its text as Redis sends it: "OOM command not allowed
    when used memory > 'maxmemory'." -> "OOM"; "ERR" for a reply without one."""
    head = message.split(" ", 1)[0]
    return head if head.isupper() else "ERR"


def error_code(exc: BaseException) -> str:
    """The Redis error code of an error reply ("OOM", "NOGROUP", "BUSYGROUP", "NOSCRIPT", ...),
    "" for anything that is not one. The one place that reads redis-py's error texts."""
    for cls, code in _CODES_OF_CLASSES:
        if isinstance(exc, cls):
            return code
    if isinstance(exc, redis.ResponseError):
        return reply_code(str(exc))
    return ""


def refused_for_now(exc: BaseException) -> bool:
    """An error reply that a later attempt of the same command can get past."""
    return error_code(exc) in REFUSED_FOR_NOW


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Turn redis-py's connection-level failures into RedisUnavailable, and an error reply
    that a later attempt can get past into RedisRefused (a RedisUnavailable too: callers
    retry both the same way). Other error replies pass through as redis.ResponseError."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        raise RedisUnavailable(f"redis unavailable: {type(exc).__name__}") from None
    except redis.ResponseError as exc:
        if refused_for_now(exc):
            raise RedisRefused(f"redis refused: {str(exc)[:120]}") from None
        raise


def connect_checked(url: str, *, name: str = "pipeline") -> redis.Redis:
    """make_client + PING; a failure is a settings error naming REDIS_URL (exit 2 at start)."""
    client = make_client(url, name=name)
    try:
        client.ping()
    except redis.AuthenticationError:
        raise SettingsError("REDIS_URL", f"authentication failed at {redact_url(url)}") from None
    except redis.ResponseError as exc:
        # e.g. NOPERM on PING for a badly written ACL: say so without the password
        raise SettingsError("REDIS_URL", f"{redact_url(url)} refused PING: {exc}") from None
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        raise SettingsError("REDIS_URL", f"cannot reach redis at {redact_url(url)}") from None
    return client
