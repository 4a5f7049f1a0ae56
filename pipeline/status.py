"""`pipeline status`: what is connected, how long the log is, how far behind each group is,
how old the views are, what was dead-lettered, how much REST weight was used.

Reads Redis only (the `status` ACL user can do it: deploy/redis/users.acl.template), a bounded
amount: SCAN with a cap, XINFO STREAM per stream (length, entries ever added, last id: what
`pipeline.health.tampering` judges), a sample of keys per view family, the newest entries of
each connection stream (`raw:conn:market`, `raw:conn:user`) and of `raw:user`,
`MEMORY USAGE ... SAMPLES 5` (exact memory of a big stream would walk all of it). The rules
that make it unhealthy are in `pipeline.health`; the retention they compare the streams with
is this command's own `PIPELINE_RETENTION`, so it must be the one the writers were given.

Accounts: every labelled account found in the log (`raw:conn:user:{label}`, `raw:user:{label}`)
or expected by PIPELINE_ACCOUNTS is reported on its own (its user stream, REST weight, views,
its orders stream's groups) and judged by `pipeline.health.account_problems`. Market shards:
each connection shows the shard its name carries (`mkt-s2of3-1`), and a shard with no open
connection while the others run is a problem.

Exit codes: 0 healthy, 1 unhealthy, 2 Redis unreachable (a bad REDIS_URL, like every command).
`--json` prints one JSON document (same facts, for scripts); otherwise rich tables.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, cast

import orjson
import redis
from rich.console import Console
from rich.table import Table

from pipeline.config import Settings, redact_url
from pipeline.errors import RedisUnavailable, SettingsError
from pipeline.eventlog import DEFAULT_RETENTION, ControlEntry, Retention, decode_entry
from pipeline.health import (
    VIEW_LIMITS,
    AccountStatus,
    ClusterNode,
    Connection,
    Group,
    Report,
    Stream,
    UserStream,
    ViewFamily,
    account_problems,
    assess,
    mark_silent,
    node_problems,
    open_connections,
    outages,
    user_stream_problems,
    user_stream_state,
)
from pipeline.redisconn import connect_checked, is_cluster, redis_errors
from pipeline.weight import utc_text
from projections.core.keys import (
    CONN_KEYS,
    DLQ_PATTERN,
    RAW_PATTERN,
    Keys,
    conn_user_key,
    raw_account,
    user_key,
)

SCAN_CAP = 50_000  # keys looked at per SCAN pattern: a bound on the cost of one status call
CONN_ENTRIES = 2_000  # newest entries of each connection stream folded into the list
USER_ENTRIES = 500  # newest raw:user entries searched for the REST weight


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--max-lag", type=int, default=10_000,
                        help="a projector group further behind than this is unhealthy")
    parser.add_argument("--sample", type=int, default=50,
                        help="keys read per view family to find the newest value")


def main(settings: Settings, args: argparse.Namespace) -> int:
    if args.max_lag < 0:
        raise SettingsError("--max-lag", f"{args.max_lag} is below 0")
    if not 1 <= args.sample <= SCAN_CAP:
        raise SettingsError("--sample", f"{args.sample} is not between 1 and {SCAN_CAP}")
    client = connect_checked(settings.redis_url, name="pipeline-status",
                             cluster=settings.redis_cluster)
    try:
        with redis_errors():
            report = collect(client, prefix=settings.view_prefix, max_lag=args.max_lag,
                             silence_timeout=settings.silence_timeout, sample=args.sample,
                             retention=settings.retention, accounts=settings.accounts)
    except RedisUnavailable as exc:
        raise SettingsError("REDIS_URL", f"{redact_url(settings.redis_url)}: {exc}") from None
    finally:
        client.close()
    if args.json:
        print(orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2).decode())
    else:
        # a pipe or a log file gets full-width tables, not 80 columns of truncated key names
        console = Console()
        render(report, console if console.is_terminal else Console(width=140))
    return 0 if report.healthy else 1


# --- reading Redis ------------------------------------------------------------------------

def collect(client: redis.Redis, *, prefix: str, max_lag: int, silence_timeout: float,
            sample: int = 50, clock: Callable[[], float] = time.time,
            retention: Mapping[str, Retention] = DEFAULT_RETENTION,
            accounts: Sequence[str | None] = (None,)) -> Report:
    """Everything status reports, in one pass. `clock` is the local clock (recv_ts, event
    times); stream ids are compared with Redis's own clock, which wrote them. `accounts`: the
    labels the deployment should run (PIPELINE_ACCOUNTS), besides those found in the log."""
    seconds, micros = client.time()
    server_ms = seconds * 1000 + micros // 1000
    now = clock()
    keys = sorted(_scan(client, RAW_PATTERN, "stream"))
    labels = account_labels(keys, accounts)
    for account in (None, *labels):
        for orders in Keys(prefix, account=account).orders_partitions():
            if client.exists(orders):
                keys.append(orders)  # the listener's groups: reported, not judged
    streams = [read_stream(client, k, server_ms, max_lag) for k in keys]
    lifecycle = _conn_entries(client, (*CONN_KEYS, *(conn_user_key(a) for a in labels)))
    conns = mark_silent(open_connections(lifecycle, now), streams, silence_timeout)
    down = outages(lifecycle, now, silence_timeout)
    views = read_views(client, prefix, sample, now)
    dead = {k: int(client.xlen(k)) for k in sorted(_scan(client, DLQ_PATTERN, "stream"))}
    problems = assess(conns, streams, views, max_lag=max_lag, retention=retention, down=down)
    user = read_user_stream(client, now)
    problems += user_stream_problems(user)
    by_account = tuple(AccountStatus(a, read_user_stream(client, now, a),
                                     read_weight(client, a), a in accounts) for a in labels)
    for status in by_account:
        problems += account_problems(status)
    nodes = read_nodes(client) if is_cluster(client) else []
    problems += node_problems(nodes)
    return Report(tuple(conns), tuple(streams), tuple(views), dead, read_weight(client),
                  tuple(problems), user, tuple(down), by_account, tuple(nodes))


def read_nodes(client: Any) -> list[ClusterNode]:
    """Redis Cluster: every node the client knows, its role, the slots it serves and how many
    replicas the slot map lists for it, its keys and memory (per node: DBSIZE, INFO)."""
    slots: dict[tuple[str, int], int] = defaultdict(int)
    replicas: dict[tuple[str, int], int] = {}
    ranges: Any = None
    for node in client.get_nodes():
        try:
            ranges = node.redis_connection.execute_command("CLUSTER", "SLOTS")
            break
        except (redis.RedisError, OSError):
            continue
    for row in ranges or ():
        lo, hi, master, *others = row
        addr = (_text(master[0]), int(master[1]))
        slots[addr] += int(hi) - int(lo) + 1
        replicas[addr] = len(others)
    out = []
    for node in sorted(client.get_nodes(), key=lambda n: (n.host, n.port)):
        addr = (node.host, int(node.port))
        try:
            r = node.redis_connection
            role = _text(r.execute_command("ROLE")[0])
            keys: int | None = int(r.execute_command("DBSIZE"))
            memory: int | None = int(r.info("memory").get("used_memory", 0))
        except (redis.RedisError, OSError):
            role, keys, memory = "unreachable", None, None
        out.append(ClusterNode(node.host, int(node.port),
                               "replica" if role == "slave" else role,
                               slots.get(addr, 0), replicas.get(addr, 0), keys, memory))
    return out


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def account_labels(raw_keys: Sequence[str], expected: Sequence[str | None]) -> list[str]:
    """The labelled accounts of the log's user streams and of the settings, sorted."""
    found = {raw_account(k)[1] for k in raw_keys}
    return sorted({a for a in (*found, *expected) if a})


def _scan(client: redis.Redis, match: str, type_: str) -> Iterator[str]:
    found = client.scan_iter(match=match, count=1000, _type=type_)
    return (k.decode() for k in itertools.islice(found, SCAN_CAP))


RawEntry = tuple[bytes, dict[bytes, bytes]]


def _newest(client: redis.Redis, key: str, count: int) -> list[RawEntry]:
    """The newest `count` entries, newest first (bytes in, bytes out: see redisconn)."""
    return cast(list[RawEntry], client.xrevrange(key, count=count))


def _id_ms(entry_id: bytes) -> int:
    return int(entry_id.split(b"-", 1)[0])


def read_stream(client: redis.Redis, key: str, server_ms: int, max_lag: int) -> Stream:
    info = cast(dict[str, Any], client.xinfo_stream(key))
    newest = info.get("last-entry")
    age = max(0.0, (server_ms - _id_ms(newest[0])) / 1000) if newest else None
    last_id = info.get("last-generated-id") or b"0-0"
    memory = client.memory_usage(key, samples=5)
    groups = tuple(read_group(client, key, g, max_lag) for g in client.xinfo_groups(key))
    added = info.get("entries-added")
    return Stream(key, int(info["length"]), memory, age, groups,
                  entries_added=None if added is None else int(added),
                  last_id=last_id.decode(),
                  last_id_ahead_s=max(0.0, (_id_ms(last_id) - server_ms) / 1000))


def read_group(client: redis.Redis, key: str, info: dict, max_lag: int) -> Group:
    name = info["name"].decode() if isinstance(info["name"], bytes) else str(info["name"])
    lag, exact = info.get("lag"), True
    if lag is None:
        # Redis cannot tell after deletions or an arbitrary SETID: count what follows the
        # group's last-delivered id, up to just past the bound.
        after = b"(" + info["last-delivered-id"]
        lag = len(cast(list[Any], client.xrange(key, min=after, max="+", count=max_lag + 1)))
        exact = lag <= max_lag
    return Group(key, name, int(info["consumers"]), int(info["pending"]), int(lag), exact)


def _conn_entries(client: redis.Redis, conn_keys: Sequence[str]) -> list[ControlEntry]:
    """The lifecycle entries of every ingestor, oldest first: the streams' ids come from
    one server clock, so merging by id keeps their order in time."""
    out = []
    raw = [e for key in conn_keys for e in _newest(client, key, CONN_ENTRIES)]
    for entry_id, fields in sorted(raw, key=lambda e: _id_order(e[0])):
        try:
            entry = decode_entry(entry_id, fields)
        except ValueError:
            continue
        if isinstance(entry, ControlEntry):
            out.append(entry)
    return out


def read_user_stream(client: redis.Redis, now: float,
                     account: str | None = None) -> UserStream | None:
    """An account's user ingestor's lifecycle and REST back-off entries, judged by `health`."""
    entries = []
    for entry_id, fields in reversed(_newest(client, conn_user_key(account), CONN_ENTRIES)):
        try:
            entry = decode_entry(entry_id, fields)
        except ValueError:
            continue
        if isinstance(entry, ControlEntry):
            entries.append(entry)
    return user_stream_state(entries, now)


def _id_order(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


def read_views(client: redis.Redis, prefix: str, sample: int, now: float) -> list[ViewFamily]:
    """Per view family: how many keys, and the age of the newest "timestamp" in a sample."""
    keys = Keys(prefix)
    out = []
    for type_ in ("string", "hash", "list", "stream"):
        by_family: dict[tuple[str, str], list[str]] = defaultdict(list)
        for key in _scan(client, keys.pattern(), type_):
            family = keys.family_of(key)
            if family is not None:
                by_family[(keys.account_of(key) or "", family)].append(key)
        for (account, family), names in sorted(by_family.items()):
            age = _newest_age(client, names[:sample], now) if type_ == "string" else None
            out.append(ViewFamily(family, type_, len(names), age, VIEW_LIMITS.get(family),
                                  account or None))
    return out


def _newest_age(client: redis.Redis, keys: list[str], now: float) -> float | None:
    newest = None
    # cluster mode: the keys spread over slots, MGET needs one: one MGET per slot
    values = client.mget_nonatomic(keys) if is_cluster(client) else client.mget(keys)  # type: ignore[attr-defined]
    for raw in values:
        try:
            ts = float(orjson.loads(raw)["timestamp"]) if raw else None
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            ts = None
        if ts is not None and (newest is None or ts > newest):
            newest = ts
    return None if newest is None else max(0.0, now - newest)


def read_weight(client: redis.Redis, account: str | None = None) -> int | None:
    """The `weight_used_1m` of the newest REST snapshot an account's user ingestor logged."""
    for entry_id, fields in _newest(client, user_key(account), USER_ENTRIES):
        if b"frame" in fields or fields.get(b"ctl") != b"snapshot":
            continue
        try:
            entry = decode_entry(entry_id, fields)
        except ValueError:
            continue
        body = entry.body if isinstance(entry, ControlEntry) else None
        if isinstance(body, dict) and body.get("weight_used_1m") is not None:
            return int(body["weight_used_1m"])
    return None


# --- terminal -----------------------------------------------------------------------------

def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def render(report: Report, console: Console) -> None:
    if report.nodes:
        console.print(_nodes_table(report.nodes))
    console.print(_connections_table(report.connections))
    console.print(_streams_table(report.streams))
    console.print(_views_table(report.views))
    dead = ", ".join(f"{k} {n}" for k, n in report.dead_letters.items()) or "none"
    weight = "-" if report.weight_used_1m is None else f"{report.weight_used_1m} / 2400"
    console.print(f"dead letters: {dead}    REST weight used (1 min): {weight}")
    if report.user_stream is not None:
        console.print(_user_line(report.user_stream))
    for acct in report.accounts:
        weight = "-" if acct.weight_used_1m is None else f"{acct.weight_used_1m} / 2400"
        line = (_user_line(acct.user_stream) if acct.user_stream is not None
                else "user stream: [red]nothing logged[/]" if acct.expected
                else "user stream: nothing logged")
        console.print(f"account {acct.account}: {line}; REST weight used (1 min): {weight}")
    if report.healthy:
        console.print("[bold green]healthy[/]")
    else:
        console.print(f"[bold red]UNHEALTHY[/] ({len(report.problems)})")
        for p in report.problems:
            console.print(f"  [red]-[/] {p}")


def _nodes_table(nodes: Sequence[ClusterNode]) -> Table:
    table = Table(title="redis cluster nodes")
    for col in ("node", "role", "slots", "replicas", "keys", "memory"):
        table.add_column(col)
    for n in nodes:
        table.add_row(f"{n.host}:{n.port}",
                      n.role if n.role != "unreachable" else "[red]unreachable[/]",
                      str(n.slots) if n.role == "master" else "-",
                      str(n.replicas) if n.role == "master" else "-",
                      "-" if n.keys is None else str(n.keys),
                      "-" if n.used_memory is None else _bytes(n.used_memory))
    return table


def _user_line(user: UserStream) -> str:
    state = "connected" if user.connected else "[red]no connection[/]"
    line = (f"user stream: {state} ({_age(user.state_age_s)}), last close: "
            f"{user.last_close or '-'}, unplanned closes in the last minute: "
            f"{user.unplanned_closes}")
    if user.backoff is not None:
        b = user.backoff
        line += (f"\nREST backing off ({b.get('scope')}) until {utc_text(float(b['until']))}: "
                 f"{b.get('status')} on {b.get('method')} {b.get('path')}, Retry-After "
                 f"{b.get('retry_after')}")
    return line


def _connections_table(conns: tuple[Connection, ...]) -> Table:
    t = Table(title="connections (open)", title_justify="left")
    for col in ("id", "path", "shard", "streams", "age", "state"):
        t.add_column(col)
    for c in conns:
        t.add_row(c.id, c.path, c.shard or "-", str(c.streams), _age(c.age_s),
                  "[red]silent[/]" if c.silent else "ok")
    return t


def _streams_table(streams: tuple[Stream, ...]) -> Table:
    t = Table(title="streams and groups", title_justify="left")
    numbers = ("length", "added", "lag", "pending")
    for col in ("stream", "length", "added", "memory", "newest", "group", "lag", "pending"):
        t.add_column(col, justify="right" if col in numbers else "left")
    for s in streams:
        added = "-" if s.entries_added is None else str(s.entries_added)
        head = [s.key, str(s.length), added, _bytes(s.memory_bytes), _age(s.newest_age_s)]
        if not s.groups:
            t.add_row(*head, "-", "-", "-")
        for i, g in enumerate(s.groups):
            lag = "?" if g.lag is None else f"{g.lag}{'' if g.lag_exact else '+'}"
            t.add_row(*(head if i == 0 else [""] * len(head)), g.name, lag, str(g.pending))
    return t


def _views_table(views: tuple[ViewFamily, ...]) -> Table:
    t = Table(title="views", title_justify="left")
    for col in ("account", "family", "type", "keys", "newest", "limit"):
        t.add_column(col)
    for v in views:
        stale = v.limit_s is not None and v.newest_age_s is not None and \
            v.newest_age_s > v.limit_s
        newest = f"[red]{_age(v.newest_age_s)}[/]" if stale else _age(v.newest_age_s)
        t.add_row(v.account or "-", v.family, v.kind, str(v.keys), newest,
                  "-" if v.limit_s is None else f"{v.limit_s:g} s")
    return t
