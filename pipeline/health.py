"""What `pipeline status` knows about a running system, and the rules that call it unhealthy.

Pure: no I/O. `pipeline.status` reads Redis into these values; `assess` turns them into the
list of problems (empty: healthy). The rules:

- lag: a projector group on a `raw:` stream with more than `max_lag` entries not yet delivered;
  a stopped projector shows here first, its views go stale next;
- stale view: the newest value of a view family is older than its limit (`VIEW_LIMITS`, by the
  value's own "timestamp", i.e. event time), or a family has no key at all while the raw stream
  that feeds it is fresh (the views expired because nothing writes them);
- silent connection: a connection the log says is open (its last entry in `raw:conn:market`
  or `raw:conn:user` is `opened`) for longer than the silence timeout, on a path whose raw
  streams got nothing for that long. Binance accepts a stream on the wrong path and then sends
  nothing, and an ingestor killed without a `closed` entry looks the same: both deserve a page.
  Not for the connections of symbols that trade in sessions (`trades_in_sessions`), quiet
  outside their session;
- a connection that cannot get a working link (`outages`): a connection name (`mkt-1`,
  `usr`) whose links have all failed for longer than the silence timeout: connects that fail
  (`closed` with `connect_failed: ...`), links a server accepts and closes at once, links
  replaced for silence one after the other. A link worked when it carried a frame or stayed
  open `WORKED_AFTER_S` (one closed for silence: until its last frame); the outage is
  counted from the end of the last one that did, and lasts until a link stays open long
  enough (after a silent one: longer than the silence timeout). The user stream has no
  silence rule and no view that goes stale, so this is how a user stream looping on rejected
  connections shows. A connection stopped on purpose (its last link `closed` with
  `shutdown`) is not judged;
- a tampered stream (`tampering`). The ACL gives each role write access to its own streams
  only, but XADD cannot be allowed without its options, so a buggy or compromised role can
  still trim its own streams (`XADD ... MAXLEN 0`) or append an explicit id far in the future
  (the largest, `18446744073709551615-18446744073709551615`, makes every later `XADD *` fail).
  Redis keeps the evidence in XINFO STREAM: a stream that is never trimmed (`raw:user`) holding
  fewer entries than were ever added to it; a count-retained stream holding less than half of
  what its retention keeps while more was added; a last id ahead of the server's clock (ids
  written with `*` come from that clock, so only an explicit id can be ahead of it).

- the user stream (`user_stream_problems`, from `raw:conn:user` alone): no working private
  connection, i.e. none open (whatever closed it, a shutdown included: the order listener
  relies on it), or one open for less than `USER_SETTLE_S` while the last minute saw
  `USER_FLAPPING_CLOSES` or more of its connections ended by anything but a shutdown or a
  rotation (a key closed under it, 4001, gives exactly that loop of short connections); and an
  IP ban (418) still running. A 429 back-off is shown, with
  its end, not judged: it lasts a minute at most.

- accounts (`account_problems`): each labelled account's user stream (`raw:conn:user:{label}`)
  by the rules above, its problems named `user stream {label}: ...`; an account the settings
  expect (PIPELINE_ACCOUNTS) whose ingestor has never logged anything is a problem too (the
  unlabelled account's silence is not: a deployment may have no user ingestor);
- market shards (`shard_problems`): connections named for shard i of n (`mkt-s2of3-1`,
  `mkt-sessions-s2of3-1`, `shard_of_name`) are open for some shards of n and none of shard i:
  that shard's symbols get no data, which no view age shows (other symbols keep the family
  fresh).

Dead letters, pending entries and REST weight are reported, not judged: they need a human look
but do not mean the views are wrong now.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from pipeline.eventlog import DEFAULT_RETENTION, ControlEntry, Retention, retention_family
from pipeline.streams import SESSION_CONN_NAME, Path, parse_stream_kind
from pipeline.weight import utc_text
from projections.core.keys import conn_user_key, family_of_key, is_raw

# Newest value of a view family older than this (seconds) is unhealthy. None: event-driven
# views (positions, balances) whose age says nothing about health.
VIEW_LIMITS: dict[str, float | None] = {
    "mark_price": 10.0,    # markPrice@1s: a value every second per symbol
    "orderbook": 10.0,     # depth 10/s
    "book_ticker": 10.0,
    "kline": 30.0,         # the open candle is pushed every 250 ms
    "last_price": 120.0,   # aggTrade: quiet markets trade less often
    "position": None,
    "balance": None,
}

# raw family -> the view family it feeds (only those with a freshness limit)
FEEDS: dict[str, str] = {
    "markPrice": "mark_price", "markPrice_arr": "mark_price",
    "depth5": "orderbook", "depth10": "orderbook", "depth20": "orderbook", "depth": "orderbook",
    "bookTicker": "book_ticker", "aggTrade": "last_price",
}


def feeds(raw_key: str) -> str | None:
    family = family_of_key(raw_key)
    if family is None:
        return None
    return "kline" if family.startswith("kline_") else FEEDS.get(family)


def path_of(raw_key: str) -> Path | None:
    """The websocket path whose frames land in `raw_key`, for families that tick every second."""
    family = family_of_key(raw_key)
    if family is None:
        return None
    spec = {"markPrice_arr": "!markPrice@arr@1s", "depth": "depth@100ms"}.get(family, family)
    try:
        kind = parse_stream_kind(spec)
    except Exception:
        return None
    return kind.path if kind.ticks_every_second else None


@attrs.frozen
class Group:
    key: str
    name: str
    consumers: int
    pending: int
    lag: int | None  # None: Redis could not tell and it was not counted
    lag_exact: bool = True  # False: counted up to a bound (`lag` is a lower bound)


# Ids written with `*` never run ahead of the server's clock; one that does was given
# explicitly. The margin covers the clock stepping back (NTP) on the Redis host.
FUTURE_ID_TOLERANCE_S = 60.0
MAX_STREAM_ID = "18446744073709551615-18446744073709551615"
# a count-retained stream (MAXLEN ~ n) never holds less than n once n were added; under half
# of that was cut by hand (or its retention was lowered since)
SHORT_FRACTION = 0.5


@attrs.frozen
class Stream:
    key: str
    length: int
    memory_bytes: int | None
    newest_age_s: float | None  # None: empty
    groups: tuple[Group, ...] = ()
    entries_added: int | None = None  # XINFO STREAM: every entry ever added
    last_id: str | None = None  # XINFO STREAM last-generated-id, even when trimmed away
    last_id_ahead_s: float = 0.0  # how far that id's time is ahead of the server's clock


@attrs.frozen
class ViewFamily:
    family: str
    kind: str  # string, hash, list, stream
    keys: int  # keys seen (bounded by the scan)
    newest_age_s: float | None  # None: no timestamp to read
    limit_s: float | None
    account: str | None = None  # the account of a user-data family (`P:acct:{label}:...`)


@attrs.frozen
class Connection:
    id: str
    name: str
    path: str
    age_s: float
    streams: int
    silent: bool = False
    shard: str | None = None  # `2/3` for a connection of market shard 2 of 3


# `ingest market` names a sharded connection `mkt-s{i}of{n}-{k}` (`mkt-sessions-s{i}of{n}-{k}`
# for symbols that trade in sessions)
_SHARD_NAME = re.compile(r"^mkt-(?:sessions-)?s(\d+)of(\d+)-\d+$")


def shard_of_name(name: str) -> str | None:
    m = _SHARD_NAME.match(name)
    return f"{int(m.group(1))}/{int(m.group(2))}" if m else None


@attrs.frozen
class ClusterNode:
    """One node of a Redis Cluster as `pipeline status` saw it."""

    host: str
    port: int
    role: str  # master, replica, or unreachable
    slots: int  # hash slots it serves (masters)
    replicas: int  # replicas the slot map lists for it (masters)
    keys: int | None
    used_memory: int | None


def node_problems(nodes: Iterable[ClusterNode]) -> list[str]:
    """A node that does not answer, a master with no replica (its loss would lose its slots'
    data and stop the cluster), slots no master serves."""
    out = []
    for n in nodes:
        if n.role == "unreachable":
            out.append(f"redis node {n.host}:{n.port}: not answering")
        elif n.role == "master" and n.slots and n.replicas == 0:
            out.append(f"redis node {n.host}:{n.port}: master of {n.slots} slots with no "
                       "replica")
    served = sum(n.slots for n in nodes if n.role == "master")
    if nodes and served < 16384:
        out.append(f"redis cluster: {16384 - served} hash slots served by no master")
    return out


@attrs.frozen
class Report:
    connections: tuple[Connection, ...]
    streams: tuple[Stream, ...]
    views: tuple[ViewFamily, ...]
    dead_letters: Mapping[str, int]
    weight_used_1m: int | None
    problems: tuple[str, ...] = ()
    user_stream: UserStream | None = None  # None: no user ingestor has logged anything
    outages: tuple[Outage, ...] = ()
    accounts: tuple[AccountStatus, ...] = ()  # the labelled accounts, by label
    nodes: tuple[ClusterNode, ...] = ()  # Redis Cluster: every node; one node: none

    @property
    def healthy(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        doc = attrs.asdict(self, recurse=True)
        doc["healthy"] = self.healthy
        if not self.nodes:  # one Redis: the report as it was before cluster mode
            del doc["nodes"]
        return doc


def open_connections(entries: Iterable[ControlEntry], now: float) -> list[Connection]:
    """Connections whose last lifecycle entry is `opened`, oldest entries first in `entries`.

    A connection whose name was opened again later was replaced (or its process restarted
    without writing `closed`): only the newest of a name counts.
    """
    last: dict[str, ControlEntry] = {}
    opened: dict[str, ControlEntry] = {}
    newest_of_name: dict[str, str] = {}
    for entry in entries:
        last[entry.conn] = entry
        if entry.ctl == "opened":
            opened[entry.conn] = entry
            body = entry.body if isinstance(entry.body, dict) else {}
            newest_of_name[str(body.get("name", entry.conn))] = entry.conn
    out = []
    for cid, entry in last.items():
        if entry.ctl != "opened" or cid not in newest_of_name.values():
            continue
        body = entry.body if isinstance(entry.body, dict) else {}
        name = str(body.get("name", cid))
        out.append(Connection(cid, name, str(body.get("path", "?")),
                              max(0.0, now - opened[cid].recv_ts), int(body.get("streams", 0)),
                              shard=shard_of_name(name)))
    return sorted(out, key=lambda c: (c.path, c.name))


def mark_silent(conns: Sequence[Connection], streams: Sequence[Stream],
                silence_timeout: float) -> list[Connection]:
    """Flag open connections on a path whose every-second raw streams are all quiet."""
    freshest: dict[str, float] = {}
    for s in streams:
        path = path_of(s.key)
        if path is not None and s.newest_age_s is not None:
            freshest[path.value] = min(freshest.get(path.value, float("inf")), s.newest_age_s)
    out = []
    for c in conns:
        quiet = freshest.get(c.path, float("inf")) > silence_timeout
        watched = c.path in (Path.PUBLIC.value, Path.MARKET.value) and not trades_in_sessions(c)
        out.append(attrs.evolve(c, silent=watched and c.age_s > silence_timeout and quiet))
    return out


def trades_in_sessions(conn: Connection) -> bool:
    """A connection of symbols that trade in sessions (TradFi perpetuals; `ingest market`
    names it `mkt-sessions-...`): outside a session its streams are quiet, so silence says
    nothing about it."""
    return conn.name.startswith(f"{SESSION_CONN_NAME}-")


WORKED_AFTER_S = 10.0  # a link open this long worked, even without a frame (a quiet account)


@attrs.frozen
class Outage:
    """A connection name with no working link for `down_s` seconds."""

    name: str
    down_s: float
    failed_links: int  # links (or connects) that failed since the last one that worked
    last_reason: str


@attrs.define
class _Links:
    """What the log says about one connection name's links, read oldest first."""

    down_since: float | None = None  # the last working link's end (or the first failure)
    failed: int = 0
    last_reason: str = ""
    open_id: str | None = None  # the link open now, if any
    open_at: float = 0.0

    def ended(self, at: float, worked: bool, reason: str) -> None:
        if worked:
            self.down_since, self.failed = at, 0
        else:
            self.failed += 1
            if self.down_since is None:
                self.down_since = at
        self.last_reason = reason

    def up(self, now: float, limit_s: float) -> bool:
        """The open link works: open long enough. After a silent one, long enough to have
        been closed for silence too (`limit_s` is the silence timeout), plus the close."""
        wait = limit_s + 5.0 if self.last_reason == "silent" else WORKED_AFTER_S
        return self.open_id is not None and now - self.open_at >= wait


class _LinkLog:
    """`outages` reading the lifecycle entries of both ingestors, oldest first."""

    def __init__(self) -> None:
        self.names: dict[str, _Links] = {}
        self.opened: dict[str, tuple[str, float]] = {}  # link id -> (name, opened at)
        self.last_frame: dict[str, float] = {}  # link id -> its last frame, from `silent`

    def read(self, entry: ControlEntry) -> None:
        body = entry.body if isinstance(entry.body, dict) else {}
        if entry.ctl == "opened":
            self._opened(entry, str(body.get("name", entry.conn)))
        elif entry.ctl == "silent" and isinstance(body.get("seconds"), int | float):
            self.last_frame[entry.conn] = entry.recv_ts - float(body["seconds"])
        elif entry.ctl == "closed":
            self._closed(entry, body)

    def _opened(self, entry: ControlEntry, name: str) -> None:
        links = self.names.setdefault(name, _Links())
        if links.open_id is not None:  # its process died without a `closed`
            links.ended(entry.recv_ts, entry.recv_ts - links.open_at >= WORKED_AFTER_S,
                        "replaced")
        links.open_id, links.open_at = entry.conn, entry.recv_ts
        self.opened[entry.conn] = (name, entry.recv_ts)

    def _closed(self, entry: ControlEntry, body: dict[str, Any]) -> None:
        name, since = self.opened.pop(entry.conn, (str(body.get("name", "")), None))
        if not name:
            return
        links = self.names.setdefault(name, _Links())
        if links.open_id == entry.conn:
            links.open_id = None
        reason = str(body.get("reason", ""))
        if reason == "shutdown" and links.open_id is None:
            self.names[name] = _Links()  # stopped on purpose: nothing to judge
            return
        frames = body.get("frames")
        carried = isinstance(frames, int) and frames > 0
        if reason == "silent":  # it worked until its last frame, if it had one
            links.ended(self.last_frame.pop(entry.conn, entry.recv_ts), carried, reason)
            return
        lasted = since is not None and entry.recv_ts - since >= WORKED_AFTER_S
        links.ended(entry.recv_ts, since is not None and (carried or lasted), reason)


def outages(entries: Iterable[ControlEntry], now: float, limit_s: float) -> list[Outage]:
    """Connection names whose links all failed for longer than `limit_s`, the silence
    timeout (entries oldest first, both connection streams)."""
    log = _LinkLog()
    for entry in entries:
        log.read(entry)
    out = []
    for name, links in sorted(log.names.items()):
        if links.up(now, limit_s):
            continue
        if links.down_since is not None and now - links.down_since > limit_s:
            out.append(Outage(name, now - links.down_since, links.failed, links.last_reason))
    return out


def tampering(streams: Sequence[Stream],
              retention: Mapping[str, Retention] = DEFAULT_RETENTION) -> list[str]:
    """What a role did to its own streams that their retention cannot explain."""
    problems = []
    for s in streams:
        if s.last_id == MAX_STREAM_ID:
            problems.append(f"stream {s.key}: its last id is the largest possible, so every "
                            "append with an automatic id (XADD *) now fails")
        elif s.last_id_ahead_s > FUTURE_ID_TOLERANCE_S:
            problems.append(f"stream {s.key}: last id {s.last_id} is {s.last_id_ahead_s:.0f} s "
                            "ahead of the server clock (an explicit id was appended)")
        if not is_raw(s.key) or s.entries_added is None or s.entries_added <= s.length:
            continue
        kept = retention.get(retention_family(s.key), Retention())
        if kept.maxlen is None and kept.max_age_s is None:
            problems.append(f"stream {s.key}: {s.entries_added - s.length} of its "
                            f"{s.entries_added} entries were removed, but it is never trimmed")
        elif kept.maxlen is not None:
            expected = min(s.entries_added, kept.maxlen)
            if s.length < expected * SHORT_FRACTION:
                problems.append(f"stream {s.key}: {s.length} entries after {s.entries_added} "
                                f"appends, far below its retention (~{kept.maxlen}): trimmed "
                                "by hand")
    return problems


def assess(conns: Sequence[Connection], streams: Sequence[Stream],
           views: Sequence[ViewFamily], *, max_lag: int,
           retention: Mapping[str, Retention] = DEFAULT_RETENTION,
           down: Sequence[Outage] = ()) -> list[str]:
    problems = []
    for s in streams:
        for g in s.groups:
            if is_raw(s.key) and g.lag is not None and g.lag > max_lag:
                more = "" if g.lag_exact else " or more"
                problems.append(f"group {g.name} on {s.key}: lag {g.lag}{more} > {max_lag}")
    for v in views:
        if v.limit_s is not None and v.newest_age_s is not None and v.newest_age_s > v.limit_s:
            problems.append(f"views {v.family}: newest is {v.newest_age_s:.1f} s old "
                            f"(limit {v.limit_s:g} s)")
    present = {v.family for v in views if v.keys}
    missing: dict[str, str] = {}
    for s in streams:
        family = feeds(s.key)
        if (family and family not in present and s.newest_age_s is not None
                and s.newest_age_s < 60 and s.length):
            missing.setdefault(family, s.key)
    problems.extend(f"views {family}: none, while {key} is being written"
                    for family, key in missing.items())
    problems.extend(f"connection {c.id} ({c.path}) is silent: no frame on its path for "
                    f"its whole silence timeout" for c in conns if c.silent)
    problems.extend(f"connection {o.name}: no working link for {o.down_s:.0f} s "
                    f"({o.failed_links} failed since, last: {o.last_reason})" for o in down)
    problems.extend(tampering(streams, retention))
    problems.extend(shard_problems(conns))
    return problems


def shard_problems(conns: Sequence[Connection]) -> list[str]:
    """Shards of n with no open connection while another shard of n has one."""
    seen: dict[int, set[int]] = {}
    for c in conns:
        if c.shard is not None:
            index, count = (int(x) for x in c.shard.split("/"))
            seen.setdefault(count, set()).add(index)
    return [f"market shard {i}/{n}: no open connection while other shards of {n} run: its "
            "symbols get no data" for n, found in sorted(seen.items())
            for i in range(1, n + 1) if i not in found]


# --- the user stream ----------------------------------------------------------------------

USER_FLAPPING_WINDOW_S = 60.0
USER_FLAPPING_CLOSES = 3
USER_SETTLE_S = 5.0  # a connection that lasted this long got past the server's 4001
PLANNED_CLOSES = frozenset({"shutdown", "rotated"})


@attrs.frozen
class UserStream:
    """What `raw:conn:user` says of the private stream and of the user ingestor's REST."""

    connected: bool
    state_age_s: float | None  # since the open connection opened, or since the last close
    last_close: str | None  # reason of the newest `closed` entry
    unplanned_closes: int  # in the last USER_FLAPPING_WINDOW_S, shutdowns and rotations aside
    backoff: Mapping[str, Any] | None = None  # the newest `rest_backoff` still running


def user_stream_state(entries: Sequence[ControlEntry], now: float) -> UserStream | None:
    """`entries`: the user ingestor's own lifecycle stream, oldest first."""
    if not entries:
        return None
    conns = open_connections([e for e in entries if e.ctl != "rest_backoff"], now)
    closes = [e for e in entries if e.ctl == "closed"]
    reasons = [str(e.body.get("reason", "")) if isinstance(e.body, dict) else "" for e in closes]
    recent = sum(1 for e, r in zip(closes, reasons, strict=True)
                 if r not in PLANNED_CLOSES and now - e.recv_ts <= USER_FLAPPING_WINDOW_S)
    if conns:
        age: float | None = min(c.age_s for c in conns)
    else:
        age = max(0.0, now - closes[-1].recv_ts) if closes else None
    backoffs = [e.body for e in entries if e.ctl == "rest_backoff" and isinstance(e.body, dict)
                and float(e.body.get("until", 0)) > now]
    return UserStream(bool(conns), age, reasons[-1] if reasons else None, recent,
                      backoffs[-1] if backoffs else None)


def user_stream_problems(user: UserStream | None, account: str | None = None) -> list[str]:
    if user is None:
        return []
    problems = []
    name = f"user stream {account}" if account else "user stream"
    if not user.connected:
        age = "" if user.state_age_s is None else f" for {user.state_age_s:.0f} s"
        problems.append(f"{name}: no working connection{age} (last close: "
                        f"{user.last_close or 'none'})")
    elif (user.unplanned_closes >= USER_FLAPPING_CLOSES
          and (user.state_age_s or 0.0) < USER_SETTLE_S):
        problems.append(f"{name}: {user.unplanned_closes} connections ended in the last "
                        f"{USER_FLAPPING_WINDOW_S:.0f} s (last: {user.last_close}): "
                        "reconnecting, not working")
    ban = user.backoff
    if ban is not None and ban.get("status") == 418:
        problems.append(f"REST: IP banned by the exchange until {utc_text(float(ban['until']))} "
                        f"(418 on {ban.get('method', '')} {ban.get('path', '')})")
    return problems


# --- accounts -----------------------------------------------------------------------------------

@attrs.frozen
class AccountStatus:
    """One labelled account: what its `raw:conn:user:{label}` and `raw:user:{label}` say."""

    account: str
    user_stream: UserStream | None  # None: its ingestor never logged anything
    weight_used_1m: int | None = None  # of its newest REST snapshot
    expected: bool = False  # named by PIPELINE_ACCOUNTS


def account_problems(status: AccountStatus) -> list[str]:
    if status.user_stream is None:
        if status.expected:
            return [f"user stream {status.account}: nothing logged in "
                    f"{conn_user_key(status.account)} (no `ingest user` with "
                    f"PIPELINE_ACCOUNT={status.account} has run)"]
        return []
    return user_stream_problems(status.user_stream, status.account)
