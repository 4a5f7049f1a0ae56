"""The batch writer's round trip on a Redis Cluster: each entry to the master of its key's slot.

    router = ClusterRouter(cluster_client, wait_keys={"raw:user"}, wait_ms=1000)
    refused = router.write(batch)     # [(index in the batch, error)], as `read_replies`

Why not redis-py's ClusterPipeline: it builds a command object per XADD and parses every reply
in Python, the per-entry cost the single-node writer avoids (`pipeline.writer`). Here the
entries stay the RESP bytes the writer packed at append time; this module only groups them
by node. The slot map is redis-py's (`RedisCluster.nodes_manager`), so the same code that
serves the projector's commands decides where the writer's go:

- one pipelined round trip per master per batch: the payload of every master is sent first,
  then the replies are read node after node, so the masters work in parallel;
- `MOVED` (a slot moved for good: reshard finished, a replica promoted): the slot map is
  reloaded and the entry sent again to the new owner in the same call;
- `ASK` (a slot being migrated, the key already on the target): `ASKING` + the entry to the
  node named, in the same call;
- a master that cannot be reached (killed, a failover in progress): its entries are answered
  as refused for now (`TRYAGAIN`), the other masters' entries are written and settle, the slot
  map is reloaded, and the writer sends the refused ones again with its backoff. It gives
  them up only when its buffer is full, in a `gap` entry, as for any refusal of the whole
  server (`pipeline.writer`): nothing Redis acknowledged is counted, nothing given up is
  silent;
- `wait_keys` (`raw:user` and the accounts' `raw:user:{label}`): after a batch wrote such an
  entry, `WAIT 1 <wait_ms>` on that master's connection: the batch is settled once a replica
  has the entries too, so an acknowledged user event survives the loss of its master. A WAIT
  that no replica answers in time is counted (`pipeline_unreplicated_total`) and logged; the
  entries stay written on the master (sending them again would not make a replica appear).

- failover loss: replication is asynchronous, so a master can acknowledge entries and die
  before its replica has them. The router keeps, per master, the entries it acknowledged in
  the last `ACK_HORIZON_S` (references to the packed bytes, no copy); when a master stops
  answering, those become suspects. Once a later call wrote without any master unreachable,
  each suspect key is read back around the suspects' time (`XRANGE`, from whichever master
  serves it now) and every suspect frame whose connection and `seq` are not there is
  reported to `on_lost`: the writer records it in its drop ledger, so the log gets a `gap`
  entry (reason `failover`) with the count, and `pipeline_failover_lost_total` counts it.
  A master that was only briefly unreachable still has them: nothing is reported. Control
  entries (no `seq`) are not checked. The window assumes the clocks of this host and of
  Redis differ by less than `CLOCK_SLACK_S`.

Entries of one key keep their order: a key has one slot, a slot one master at a time, and one
connection carries them in order. Across a redirect, the entries redirected are re-sent after
the ones that were written, in their batch order.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Collection
from typing import Any

import hiredis
import redis
from redis.crc import key_slot

from pipeline import metrics
from pipeline.errors import RedisUnavailable
from pipeline.redisconn import redis_errors
from pipeline.replies import read_replies

log = logging.getLogger("pipeline.writer")

MAX_REDIRECTS = 5  # rounds of MOVED/ASK one call follows before answering TRYAGAIN
UNREACHABLE = "TRYAGAIN cluster node unreachable"
ACK_HORIZON_S = 2.0  # acknowledged entries kept per master: far beyond a replica's usual lag
CLOCK_SLACK_S = 1.0
READ_BACK_PAGE = 5_000
Item = tuple[str, bytes]
Acked = tuple[float, str, bytes]  # (acknowledged at, key, packed XADD)
# (key, receipt time, connection) of a frame a failover lost
OnLost = Callable[[str, float, str], None]


class ClusterRouter:
    def __init__(self, client: Any, *, wait_keys: Callable[[str], bool] | Collection[str] = (),
                 wait_ms: int = 0, on_lost: OnLost | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._client = client
        self._slots: dict[str, int] = {}
        self._wait = wait_keys if callable(wait_keys) else frozenset(wait_keys).__contains__
        self.wait_ms = wait_ms
        self._unreplicated_logged = 0.0
        self.on_lost = on_lost
        self.clock = clock
        self._acked: dict[str, deque[Acked]] = {}  # node name -> recently acknowledged
        self._suspects: dict[str, list[Acked]] = {}  # node name -> acked when it went away

    def _slot(self, key: str) -> int:
        slot = self._slots.get(key)
        if slot is None:
            if len(self._slots) > 100_000:
                self._slots.clear()
            slot = self._slots[key] = key_slot(key.encode())
        return slot

    def _refresh(self) -> None:
        try:
            with redis_errors():
                self._client.nodes_manager.initialize()
        except (RedisUnavailable, redis.RedisError, redis.exceptions.RedisClusterException) as exc:
            log.warning("cluster slot map not reloaded", extra={"error": str(exc)[:120]})

    def write(self, batch: list[Item]) -> list[tuple[int, str]]:
        """Write `batch`; the indices and errors of the entries Redis refused."""
        todo = list(range(len(batch)))
        asks: dict[int, str] = {}  # index -> node name an ASK named
        refused: list[tuple[int, str]] = []
        for _ in range(MAX_REDIRECTS):
            moved, again, errors = self._round(batch, todo, asks)
            refused += errors
            if moved:
                self._refresh()
            if not again:
                break
            todo = sorted(again)
            asks = {i: again[i] for i in todo if again[i]}
        else:
            refused += [(i, UNREACHABLE) for i in todo]
        refused.sort()
        if self._suspects and not any(e == UNREACHABLE for _, e in refused):
            self._check_suspects()
        return refused

    def _round(self, batch: list[Item], todo: list[int], asks: dict[int, str]
               ) -> tuple[bool, dict[int, str], list[tuple[int, str]]]:
        """One round trip per node: (a MOVED was seen, index -> ASK target ("" for MOVED) to
        send again, the refusals)."""
        nm = self._client.nodes_manager
        groups: dict[str, list[int]] = {}
        nodes: dict[str, Any] = {}
        refused: list[tuple[int, str]] = []
        unreachable = False
        for i in todo:
            target = asks.get(i)
            try:
                node = nm.get_node(node_name=target) if target else \
                    nm.get_node_from_slot(self._slot(batch[i][0]))
            except (redis.RedisError, redis.exceptions.RedisClusterException):
                node = None
            if node is None:
                refused.append((i, UNREACHABLE))
                unreachable = True
                continue
            nodes[node.name] = node
            groups.setdefault(node.name, []).append(i)
        sent: list[tuple[str, Any, Any, list[int]]] = []
        for name, idx in groups.items():
            node = nodes[name]
            pool = node.redis_connection.connection_pool
            conn = None
            try:
                with redis_errors():
                    conn = pool.get_connection()
                    parts = [(b"*1\r\n$6\r\nASKING\r\n" + batch[i][1]) if i in asks
                             else batch[i][1] for i in idx]
                    conn.send_packed_command([b"".join(parts)], check_health=False)
                sent.append((name, pool, conn, idx))
            except RedisUnavailable:
                if conn is not None:
                    conn.disconnect()
                    pool.release(conn)
                refused += [(i, UNREACHABLE) for i in idx]
                unreachable = True
                self._went_away(name)
        moved = False
        again: dict[int, str] = {}
        for name, pool, conn, idx in sent:
            asked = [i in asks for i in idx]
            n = len(idx) + sum(asked)
            try:
                with redis_errors():
                    errors = read_replies(conn, n)
                    if self.wait_ms and any(self._wait(batch[i][0]) for i in idx):
                        self._wait_replica(conn, name)
            except RedisUnavailable:
                conn.disconnect()
                pool.release(conn)
                refused += [(i, UNREACHABLE) for i in idx]
                unreachable = True
                self._went_away(name)
                continue
            pool.release(conn)
            self._remember(name, batch, idx, asked, errors)
            if not errors:
                continue
            # reply positions -> batch indices (an ASKING adds one reply before its entry)
            position: dict[int, int] = {}
            pos = 0
            for i, a in zip(idx, asked, strict=True):
                pos += a
                position[pos] = i
                pos += 1
            for p, error in errors:
                j = position.get(p)
                if j is None:
                    continue  # ASKING refused: its entry's own reply says what happened
                if error.startswith("MOVED "):
                    moved = True
                    again[j] = ""
                    metrics.REDIRECTS.labels("moved").inc()
                elif error.startswith("ASK "):
                    again[j] = _ask_target(error)
                    metrics.REDIRECTS.labels("ask").inc()
                elif error.startswith(("CLUSTERDOWN", "TRYAGAIN")):
                    refused.append((j, error))
                    unreachable = True
                else:
                    refused.append((j, error))
        return moved or unreachable, again, refused

    def _remember(self, name: str, batch: list[Item], idx: list[int], asked: list[bool],
                  errors: list[tuple[int, str]]) -> None:
        """Keep the entries `name` acknowledged (for `ACK_HORIZON_S`): suspects if it dies."""
        now = self.clock()
        acked = self._acked.get(name)
        if acked is None:
            acked = self._acked[name] = deque()
        if errors:
            failed = {p for p, _ in errors}
            pos = 0
            for i, a in zip(idx, asked, strict=True):
                pos += a
                if pos not in failed:
                    acked.append((now, batch[i][0], batch[i][1]))
                pos += 1
        else:
            acked.extend([(now, batch[i][0], batch[i][1]) for i in idx])
        horizon = now - ACK_HORIZON_S
        while acked and acked[0][0] < horizon:
            acked.popleft()

    def _went_away(self, name: str) -> None:
        acked = self._acked.pop(name, None)
        if acked:
            self._suspects.setdefault(name, []).extend(acked)

    def _check_suspects(self) -> None:
        """Read back what the masters that went away had acknowledged; report what is gone."""
        by_key: dict[str, list[tuple[float, dict[bytes, bytes]]]] = {}
        for entries in self._suspects.values():
            for at, key, command in entries:
                fields = _fields(command)
                if b"seq" in fields and b"conn" in fields:
                    by_key.setdefault(key, []).append((at, fields))
        lost = 0
        try:
            for key, items in by_key.items():
                lo = min(at for at, _ in items) - CLOCK_SLACK_S
                hi = max(at for at, _ in items) + CLOCK_SLACK_S
                there = self._read_back(key, lo, hi)
                for _, fields in items:
                    if (fields[b"conn"], fields[b"seq"]) not in there:
                        lost += 1
                        metrics.FAILOVER_LOST.labels(key).inc()
                        if self.on_lost is not None:
                            self.on_lost(key, float(fields.get(b"recv_ts", b"0")),
                                         fields[b"conn"].decode())
        except (RedisUnavailable, redis.RedisError) as exc:
            log.warning("failover check postponed", extra={"error": str(exc)[:120]})
            return  # not readable yet: the next call that writes everything tries again
        self._suspects.clear()
        if lost:
            log.error("entries a master acknowledged were lost in a failover: gap recorded",
                      extra={"lost": lost, "keys": len(by_key)})
        else:
            log.warning("failover: every entry the lost master acknowledged is on its replica",
                        extra={"checked": sum(map(len, by_key.values()))})

    def _read_back(self, key: str, lo: float, hi: float) -> set[tuple[Any, Any]]:
        """(conn, seq) of the frames `key` holds between the times `lo` and `hi` (s), read in
        pages of `READ_BACK_PAGE` entries so that a busy stream costs no big reply."""
        there: set[tuple[Any, Any]] = set()
        start, end = f"{int(lo * 1000)}", f"{int(hi * 1000)}"
        while True:
            with redis_errors():
                rows: Any = self._client.xrange(key, start, end, count=READ_BACK_PAGE)
            there.update((f.get(b"conn"), f.get(b"seq")) for _, f in rows if f)
            if len(rows) < READ_BACK_PAGE:
                return there
            last = rows[-1][0]
            start = "(" + (last.decode() if isinstance(last, bytes) else str(last))

    def _wait_replica(self, conn: Any, node: str) -> None:
        """WAIT 1 <wait_ms> on the connection that just wrote user entries."""
        started = time.perf_counter()
        conn.send_command("WAIT", 1, self.wait_ms, check_health=False)
        try:
            acked = conn.read_response()
        except redis.ResponseError as exc:  # NOPERM (an ACL without +wait): counted, logged
            log.warning("WAIT refused", extra={"node": node, "error": str(exc)[:120]})
            acked = 0
        metrics.REDIS_WAIT_SECONDS.observe(time.perf_counter() - started)
        if int(acked) < 1:
            metrics.UNREPLICATED.inc()
            now = time.monotonic()
            if now - self._unreplicated_logged > 10.0:
                self._unreplicated_logged = now
                log.warning("user entries written on a master that no replica acknowledged in "
                            "time", extra={"node": node, "wait_ms": self.wait_ms})


def _fields(command: bytes) -> dict[bytes, bytes]:
    """The field/value pairs of one packed `XADD key [trim] * f v ...`."""
    reader = hiredis.Reader()
    reader.feed(command)
    args = reader.gets()
    if not isinstance(args, list) or b"*" not in args[2:]:
        return {}
    start = args.index(b"*", 2) + 1
    return dict(zip(args[start::2], args[start + 1::2], strict=False))


def _ask_target(error: str) -> str:
    """`ASK 3999 127.0.0.1:6381` -> `127.0.0.1:6381` (redis-py's node name)."""
    parts = error.split()
    return parts[2] if len(parts) >= 3 else ""
