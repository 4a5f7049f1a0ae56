"""The projector's Redis function library: every view, order and lease write, versioned; and
`pipeline functions load`, which puts it on the server.

Why functions, not scripts: the projector's Redis user may call `FCALL`/`FCALL_RO` of this
library and no other Lua: no `EVAL`, `EVALSHA` or `SCRIPT` (deploy/redis/users.acl.template).
With EVAL it could run any code (`EVAL "while true do end" 0` made every client BUSY until an
admin ran SCRIPT KILL, and Redis's Lua CVEs all need EVAL).

The library (Redis 7 `FUNCTION LOAD`) is lua/views.lua, lua/orders.lua, lua/streams.lua and
lua/lease.lua. Its name carries its version, the first 12 hex digits of the SHA-1 of its code
(`pipeline_<version>`), and so does each function (`pipeline_<version>_views`, `..._order`,
`..._append`, `..._lease_acquire`, `..._lease_renew`, `..._version`). A projector therefore
calls only the code it was built with: a library of another version on the server is not its
own, so it is found missing (and loaded, or reported), never silently used; during a rolling
upgrade old and new projectors each call their own.

Loading:
- `pipeline functions load` (the admin user, at deployment; the compose deployment runs it as a
  one-shot service): `FUNCTION LOAD REPLACE` of this version, using REDIS_URL.
- `FunctionLibrary.ensure(client)`, called by the projector at start and by every store that
  finds its functions missing (a Redis restarted without persistence, a FUNCTION FLUSH):
  `FCALL_RO <library>_version`; when missing, `FUNCTION LOAD` if this user may (a local Redis
  without ACL: tests, the demo). If it may not, it logs one line saying what to run and raises
  `LibraryMissing` (a RedisUnavailable: callers retry with backoff) while the projector's
  health fails. There is no fallback to EVAL.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import threading
from importlib import resources

import redis
import redis.cluster

from pipeline.config import Settings
from pipeline.errors import RedisUnavailable
from pipeline.redisconn import connect_checked, is_cluster, redis_errors
from projections.shell.health import ProjectorHealth

log = logging.getLogger("pipeline.project")

_PARTS = ("views.lua", "orders.lua", "streams.lua", "lease.lua")
# function name suffix -> the Lua local that implements it
_FUNCTIONS = {"views": "views_write", "order": "order_write", "append": "stream_append",
              "lease_acquire": "lease_acquire", "lease_renew": "lease_renew"}
_REGISTER = "redis.register_function('@LIB@_{name}', {local})\n"
_REGISTER_VERSION = ("redis.register_function{function_name='@LIB@_version', "
                     "callback=function() return '@VERSION@' end, flags={'no-writes'}}\n")


def _body() -> str:
    lua = resources.files("projections.shell").joinpath("lua")
    parts = [lua.joinpath(p).read_text() for p in _PARTS]
    registrations = "".join(_REGISTER.format(name=n, local=f) for n, f in _FUNCTIONS.items())
    return "\n".join(parts) + "\n" + registrations + _REGISTER_VERSION


_TEMPLATE = _body()
VERSION = hashlib.sha1(_TEMPLATE.encode()).hexdigest()[:12]
LIBRARY = f"pipeline_{VERSION}"
CODE = f"#!lua name={LIBRARY}\n" + _TEMPLATE.replace("@LIB@", LIBRARY).replace(
    "@VERSION@", VERSION)

VIEWS_FN = f"{LIBRARY}_views"
ORDER_FN = f"{LIBRARY}_order"
APPEND_FN = f"{LIBRARY}_append"
LEASE_ACQUIRE_FN = f"{LIBRARY}_lease_acquire"
LEASE_RENEW_FN = f"{LIBRARY}_lease_renew"
VERSION_FN = f"{LIBRARY}_version"

MISSING_LINE = (f"redis function library {LIBRARY} is not loaded and this Redis user may not "
                "load it: run `pipeline functions load` as the admin user (retrying)")


class LibraryMissing(RedisUnavailable):
    """This version's library is not on the server and this user may not load it."""


def function_missing(exc: BaseException) -> bool:
    """Is this Redis's answer to FCALL of a function it does not hold?"""
    return isinstance(exc, redis.ResponseError) and "function not found" in str(exc).lower()


def load(client: redis.Redis) -> None:
    """FUNCTION LOAD REPLACE of this version's library (redis-py errors pass through); in
    cluster mode on every master (RedisCluster sends FUNCTION LOAD to all of them)."""
    client.function_load(CODE, replace=True)


def _check_version(client: redis.Redis) -> None:
    """FCALL_RO of the version function: on one node, or on every master of a cluster (a
    function is per node: the slot of a key decides which node runs it)."""
    if is_cluster(client):
        client.execute_command("FCALL_RO", VERSION_FN, 0,
                               target_nodes=redis.cluster.RedisCluster.PRIMARIES)
    else:
        client.fcall_ro(VERSION_FN, 0)


class FunctionLibrary:
    """Makes sure this version's library is on the server; one per process, shared by every
    store and lease, so that a missing library is reported in one line and in the health."""

    def __init__(self, health: ProjectorHealth | None = None) -> None:
        self.health = health
        self._lock = threading.Lock()
        self._reported = False

    def ensure(self, client: redis.Redis) -> None:
        """Return once the library is on the server (loading it if this user may); raise
        LibraryMissing when it is not and may not be loaded, RedisUnavailable when Redis is
        away or refuses for now."""
        with redis_errors():
            try:
                _check_version(client)
            except redis.ResponseError as exc:
                if not function_missing(exc):
                    raise
            else:
                return self._present()
            try:
                load(client)
            except redis.exceptions.NoPermissionError:
                self._refused()
                raise LibraryMissing(MISSING_LINE) from None
        log.info("redis function library loaded", extra={"library": LIBRARY})
        self._present()

    def _present(self) -> None:
        with self._lock:
            reported, self._reported = self._reported, False
        if reported:
            log.info("redis function library present", extra={"library": LIBRARY})
        if self.health is not None:
            self.health.recovered("functions")

    def _refused(self) -> None:
        with self._lock:
            first, self._reported = not self._reported, True
        if first:
            log.error(MISSING_LINE)
        if self.health is not None:
            self.health.failed("functions")


# for stores and leases made without one (replay, tests): no health to report to
DEFAULT = FunctionLibrary()


# --- `pipeline functions load` ---------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Load the projector's Redis function library (FUNCTION LOAD REPLACE) "
                          "into REDIS_URL; run it as the admin user at deployment.")


def main(settings: Settings, args: argparse.Namespace) -> int:
    client = connect_checked(settings.redis_url, name="functions",
                             cluster=settings.redis_cluster)
    try:
        load(client)
    except redis.exceptions.NoPermissionError:
        print("pipeline functions load: the user of REDIS_URL may not run FUNCTION LOAD: "
              "run it as the admin user", file=sys.stderr)
        return 1
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        print(f"pipeline functions load: redis unavailable: {type(exc).__name__}",
              file=sys.stderr)
        return 1
    except redis.ResponseError as exc:
        print(f"pipeline functions load: redis refused: {str(exc)[:200]}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(f"loaded redis function library {LIBRARY}")
    return 0
