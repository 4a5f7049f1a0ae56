"""The one place a Redis client is made and redis-py's errors become ours.

Settings that bite under Trio (redis-py's asyncio client does not run on Trio, so the
ingestor and projectors use the sync client from worker threads):
- `socket_timeout` (10 s) is longer than any BLOCK this project issues (`MAX_BLOCK_MS`), so a
  blocking XREADGROUP never looks like a dead server;
- no automatic retry: redis-py would re-send an `XADD *` after a timeout and log the frame twice;
  the writer retries whole batches itself (see `pipeline.eventlog` for what a duplicate is);
- RESP2 and legacy response shapes, so XREADGROUP/XAUTOCLAIM replies keep one shape across
  redis-py upgrades; bytes in, bytes out (`decode_responses=False`): frames stay exact.

Redis Cluster (PIPELINE_REDIS_CLUSTER, or detected: `INFO cluster` says `cluster_enabled:1`):
`connect_checked` decides once per process, sets the key layout
(`projections.core.keys.set_cluster_layout`), and from then on `make_client` returns a
`redis.cluster.RedisCluster` with the same pinned settings. It routes every command by the
slot of its keys, follows MOVED and ASK, and reloads the slot map after a connection error or
a CLUSTERDOWN (a failover); its pipelines split per node. It re-sends nothing after a
connection error (`retry` 0, as above): the caller retries, as on one node. The batch writer
does its own routing over the cluster's nodes (`pipeline.clusterwriter`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, cast

import redis
import redis.cluster
from redis.backoff import NoBackoff
from redis.retry import Retry

from pipeline.config import redact_url
from pipeline.errors import RedisRefused, RedisUnavailable, SettingsError
from projections.core.keys import cluster_layout, set_cluster_layout

SOCKET_TIMEOUT_S = 10.0
MAX_BLOCK_MS = 2_000


def make_client(url: str, *, name: str = "pipeline",
                socket_timeout: float = SOCKET_TIMEOUT_S) -> redis.Redis:
    """A client with the pinned settings above. Does not connect yet. (`socket_timeout`:
    tests of a frozen server shorten it; it must stay above `MAX_BLOCK_MS`.) In cluster mode
    (`connect_checked` found one) a RedisCluster, which connects to learn the slot map."""
    if cluster_layout():
        return make_cluster_client(url, name=name, socket_timeout=socket_timeout)
    return redis.Redis.from_url(url, **_pinned(name, socket_timeout))


def _pinned(name: str, socket_timeout: float) -> dict[str, object]:
    """The options above, the same for one node and a cluster."""
    return {"socket_timeout": socket_timeout, "socket_connect_timeout": 5.0,
            "retry": Retry(NoBackoff(), 0), "retry_on_timeout": False, "protocol": 2,
            "legacy_responses": True, "decode_responses": False,
            "health_check_interval": 0, "client_name": name}


def make_cluster_client(url: str, *, name: str = "pipeline",
                        socket_timeout: float = SOCKET_TIMEOUT_S) -> redis.Redis:
    """A RedisCluster with the pinned settings, typed as the Redis it stands in for (it has
    the same command methods). Raises RedisUnavailable when no node answers."""
    try:
        with redis_errors():
            client = redis.cluster.RedisCluster.from_url(
                url, **_pinned(name, socket_timeout), require_full_coverage=False)
    except redis.cluster.RedisClusterException as exc:
        raise RedisUnavailable(f"redis cluster unavailable: {str(exc)[:120]}") from None
    return cast(redis.Redis, client)


def is_cluster(client: Any) -> bool:
    """Whether `client` is a RedisCluster (cluster mode)."""
    return isinstance(client, redis.cluster.RedisCluster)


def cluster_enabled(client: redis.Redis) -> bool | None:
    """What the node says (`INFO cluster`: cluster_enabled:1); None when it refuses INFO."""
    try:
        info: Any = client.info("cluster")
    except redis.ResponseError:
        return None
    return str(info.get("cluster_enabled", 0)) == "1"


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
    except (redis.exceptions.ClusterDownError, redis.exceptions.SlotNotCoveredError,
            redis.exceptions.ClusterError) as exc:
        # cluster mode: a failover in progress, a slot without a master, redirections without end
        raise RedisUnavailable(f"redis cluster unavailable: {type(exc).__name__}") from None
    except redis.ResponseError as exc:
        if refused_for_now(exc):
            raise RedisRefused(f"redis refused: {str(exc)[:120]}") from None
        raise


def connect_checked(url: str, *, name: str = "pipeline",
                    cluster: bool | None = None) -> redis.Redis:
    """make_client + PING; a failure is a settings error naming REDIS_URL (exit 2 at start).

    Decides cluster mode for the process: `cluster` (PIPELINE_REDIS_CLUSTER; None: unset) and
    what the node says must agree, else a settings error naming PIPELINE_REDIS_CLUSTER. A node
    that refuses INFO leaves the setting to decide."""
    set_cluster_layout(False)
    client = make_client(url, name=name)
    _ping(client, url)
    enabled = cluster_enabled(client)
    if cluster is not None and enabled is not None and cluster != enabled:
        client.close()
        raise SettingsError("PIPELINE_REDIS_CLUSTER", (
            f"is {int(cluster)} but {redact_url(url)} says cluster_enabled:{int(enabled)}"))
    if cluster if enabled is None else enabled:
        client.close()
        set_cluster_layout(True)
        try:
            client = make_client(url, name=name)
        except RedisUnavailable:
            raise SettingsError("REDIS_URL", f"cannot reach the cluster at {redact_url(url)}"
                                ) from None
        _ping(client, url)
    return client


def _ping(client: redis.Redis, url: str) -> None:
    try:
        client.ping()
    except redis.AuthenticationError:
        raise SettingsError("REDIS_URL", f"authentication failed at {redact_url(url)}") from None
    except redis.ResponseError as exc:
        # e.g. NOPERM on PING for a badly written ACL: say so without the password
        raise SettingsError("REDIS_URL", f"{redact_url(url)} refused PING: {exc}") from None
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        raise SettingsError("REDIS_URL", f"cannot reach redis at {redact_url(url)}") from None
