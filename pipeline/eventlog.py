"""The event log: which `raw:` stream a frame goes to and what one entry holds.

Pure: no I/O. The writer (`pipeline.writer`) turns these entries into XADD commands; the
projectors (`projections.shell.project`) read them back with `decode_entry`.

Keys (documented with sizes in docs/architecture.md):
- `raw:market:{family}`  one stream per market stream family (markPrice, depth20, depth,
  aggTrade, kline_1m, bookTicker, forceOrder, markPrice_arr). Every symbol of a family shares it;
  the frame's own "stream" field tells the symbol. A symbol's frames are in exchange order.
- `raw:market:other`  frames that name no known stream: SUBSCRIBE replies, malformed, binary,
  oversized or unknown frames. Logged as received and counted, never dropped.
- `raw:user`  every frame of the user-data stream plus the REST snapshots of reconciliation.
- `raw:conn:market`, `raw:conn:user`  connection lifecycle of each ingestor: opened, closed,
  silent, rotated.
- `raw:depth_snapshots`  the projector's depth snapshots and diff-depth gaps.

Entry fields:
- frame entry: `frame` (exact bytes as received), `recv_ts` (local receipt time, unix seconds
  with microseconds, as text), `conn` (connection id), `seq` (frame number on that connection).
  A retried XADD after a Redis failure may log a frame twice: a duplicate is an entry with the
  same `conn` and `seq` as an earlier one. Projections ignore it because its order key (event
  time, update id) is not newer than what the view holds.
- control entry (no `frame` field): `ctl` (opened, closed, silent, rotated, gap, snapshot,
  final_state), `body` (JSON), `recv_ts`, `conn`.

Gap entries of the ingestors (`gap_body`): on the raw key that lost entries, one per cause,
appended once Redis accepts writes again, whatever the fault and however long it lasted:
`reason`, `dropped` (entries), `first_recv_ts` / `last_recv_ts` (receipt times of the first and
last lost entry), `by_conn` (count per connection id; "" for control entries). Causes:
- `buffer_full`: the ingestor's buffer had reached one of its bounds (`PIPELINE_BUFFER_FRAMES`
  or `PIPELINE_BUFFER_BYTES`) while Redis was unreachable, frozen or refusing;
- `refused: <Redis's error reply>` (`refused: OOM command not allowed when used memory >
  'maxmemory'.`, `refused: WRONGTYPE ...`): Redis refused the entry itself. An entry refused
  because the server as a whole cannot write (OOM, READONLY, LOADING...) is given up only when
  the buffer is full; one refused for a reason of its own key (WRONGTYPE, NOPERM) after a few
  attempts.
A gap entry is written like any entry: an outage that cuts its round trip short may log it
twice, byte for byte (same `recv_ts` and body). The diff-depth projector writes gap entries of
its own (`reason: "pu break"`, in `raw:depth_snapshots`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import orjson

from pipeline.errors import SettingsError
from projections.core.keys import (
    CONN_PREFIX,
    KEY_DEPTH_SNAPSHOTS,
    KEY_OTHER,
    MARKET_PREFIX,
    RAW_PREFIX,
    market_key,
    raw_account,
    strip_tag,
)

# Binance's combined form: `{"stream":"<name>","data":<payload>}`, "stream" always first.
WRAPPER_HEAD = b'{"stream":"'
_NAME_START = len(WRAPPER_HEAD)
# The stream name's closing quote must lie within this many bytes of the frame's start.
# Binance's longest names (a 24-letter symbol with a delivery date and `@depth20@100ms`) end
# before byte 60; a frame with a longer name is not read as a wrapper at all.
STREAM_NAME_SCAN = 120
_DATA_OBJECT = b'","data":{'


def stream_name(frame: bytes, complete: bool = False) -> bytes | None:
    """The stream name of a combined frame, read from its first bytes without parsing the JSON:
    `b'{"stream":"btcusdt@aggTrade","data":{...}}'` -> `b"btcusdt@aggTrade"`. None when the frame
    does not start with the wrapper or the name does not end within `STREAM_NAME_SCAN` bytes.

    By default only the head is looked at, so a truncated or otherwise broken frame still gives
    its name: the ingestor routes it to its stream's key, where the projector dead-letters it.
    `complete=True` also asks for an object payload right after the name (`","data":{`) and
    the last bytes of a whole wrapper (`}}`): the projector's coalescing skips a frame only
    when a later frame of the same stream supersedes it, and a frame failing this is never
    skipped (`projections.core.frames.wrapped_stream`). Hot path on both sides: one call per
    frame.
    """
    if not frame.startswith(WRAPPER_HEAD):
        return None
    end = frame.find(b'"', _NAME_START, STREAM_NAME_SCAN)
    if end < 0 or (complete and not (frame.startswith(_DATA_OBJECT, end)
                                     and frame.endswith(b"}}"))):
        return None
    return frame[_NAME_START:end]


def family_of_stream(name: str) -> str | None:
    """`btcusdt@depth20@100ms` -> `depth20`; `!markPrice@arr@1s` -> `markPrice_arr`."""
    if name.startswith("!markPrice@arr"):
        return "markPrice_arr"
    parts = name.split("@")
    if len(parts) < 2:
        return None
    kind = parts[1]
    if kind == "markPrice" or kind == "aggTrade" or kind == "bookTicker" or kind == "forceOrder":
        return kind
    if kind.startswith("kline_"):
        return kind
    if kind in ("depth", "depth5", "depth10", "depth20"):
        return kind
    return None


def route_stream(name: bytes) -> str:
    """The raw key of the frames of stream `name`: `b"btcusdt@aggTrade"` ->
    `raw:market:aggTrade`; `raw:market:other` for a name of no known stream family."""
    family = family_of_stream(name.decode("ascii", "replace"))
    return market_key(family) if family else KEY_OTHER


def route_frame(frame: bytes) -> str:
    """The raw key a market frame belongs to, by the stream its wrapper names (`stream_name`);
    `raw:market:other` for anything else: SUBSCRIBE replies, non-JSON, binary, unknown streams.
    The ingestor caches the answer per name (`pipeline.ingest_market.cached_router`)."""
    name = stream_name(frame)
    return KEY_OTHER if name is None else route_stream(name)


def format_ts(ts: float) -> bytes:
    return b"%.6f" % ts


def frame_entry(frame: bytes, recv_ts: float, conn: str, seq: int) -> dict[bytes, bytes]:
    return {b"frame": frame, b"recv_ts": format_ts(recv_ts), b"conn": conn.encode(),
            b"seq": b"%d" % seq}


def control_entry(ctl: str, body: Mapping[str, Any], recv_ts: float, conn: str = "") -> dict[
    bytes, bytes
]:
    return {b"ctl": ctl.encode(), b"body": orjson.dumps(body), b"recv_ts": format_ts(recv_ts),
            b"conn": conn.encode()}


GAP_BUFFER_FULL = "buffer_full"
# Redis Cluster: entries a master acknowledged and its promoted replica never received
# (pipeline.clusterwriter checks after a failover)
GAP_FAILOVER = "failover"
GAP_REFUSED = "refused: "  # + Redis's error reply, as Redis wrote it
MAX_REASON_CHARS = 200


def refused_reason(error: str) -> str:
    """The gap reason of entries Redis refused with the error reply `error`."""
    return (GAP_REFUSED + error)[:MAX_REASON_CHARS]


def gap_body(reason: str, dropped: int, first_recv_ts: float, last_recv_ts: float,
             by_conn: Mapping[str, int]) -> dict[str, Any]:
    """The body of an ingestor's `gap` control entry (the causes: module docstring)."""
    return {"reason": reason, "dropped": dropped, "first_recv_ts": round(first_recv_ts, 6),
            "last_recv_ts": round(last_recv_ts, 6), "by_conn": dict(by_conn)}


@attrs.frozen
class FrameEntry:
    id: bytes
    frame: bytes
    recv_ts: float
    conn: str
    seq: int


@attrs.frozen
class ControlEntry:
    id: bytes
    ctl: str
    body: Any
    recv_ts: float
    conn: str


def decode_entry(entry_id: bytes, fields: Mapping[bytes, bytes]) -> FrameEntry | ControlEntry:
    """Read one stream entry back. Raises ValueError on an entry this project did not write."""
    try:
        recv_ts = float(fields[b"recv_ts"])
        conn = fields.get(b"conn", b"").decode()
        if b"frame" in fields:
            return FrameEntry(entry_id, fields[b"frame"], recv_ts, conn,
                              int(fields.get(b"seq", b"0")))
        return ControlEntry(entry_id, fields[b"ctl"].decode(), orjson.loads(fields[b"body"]),
                            recv_ts, conn)
    except (KeyError, ValueError, orjson.JSONDecodeError) as exc:
        raise ValueError(f"not an event-log entry: {exc!r}") from exc


# --- retention -----------------------------------------------------------------------------

@attrs.frozen
class Retention:
    """Either a count (XADD MAXLEN ~ n) or an age (XADD MINID ~ now-age); None keeps all."""

    maxlen: int | None = None
    max_age_s: float | None = None


# Sized for the whole market on one Redis with ~8 GB. Bytes a retained entry takes (`MEMORY
# USAGE` / `XLEN`, bench/bench_full_market.py, 550 symbols, docs/benchmarks.md) and what each
# default holds: ~3.2 GB for every family with one kline interval, ~1.5 GB for markPrice@1s,
# kline_1m, aggTrade and depth20; each further kline interval ~0.2 GB.
DEFAULT_RETENTION: dict[str, Retention] = {
    "markPrice": Retention(maxlen=1_000_000),  # 297 B: 297 MB, 30 min of 550 symbols x 1/s
    "markPrice_arr": Retention(maxlen=3_600),  # 99 KB (550 symbols a frame): 356 MB, 1 h
    "depth5": Retention(maxlen=300_000),  # 508 B: 152 MB
    "depth10": Retention(maxlen=300_000),  # 754 B: 226 MB
    "depth20": Retention(maxlen=300_000),  # 1,133 B: 340 MB; 10 min of 50 symbols at 10/s
    "depth": Retention(maxlen=1_000_000),  # diff depth, 399 B: 399 MB
    "aggTrade": Retention(maxlen=2_000_000),  # 288 B: 576 MB; ~50 min calm, ~12 min in a crash
    "bookTicker": Retention(maxlen=1_000_000),  # 288 B: 288 MB
    "forceOrder": Retention(maxlen=100_000),  # 330 B: 33 MB
    "kline": Retention(maxlen=500_000),  # each kline_<interval> key, ~420-450 B: ~215 MB
    "other": Retention(maxlen=100_000),
    "conn": Retention(maxlen=100_000),  # each of raw:conn:market and raw:conn:user
    # a 1000-level snapshot is ~50 KB: ~200 MB at most, 10 snapshots of each of 400 symbols
    "depth_snapshots": Retention(maxlen=4_000),
    "user": Retention(),  # user data is never trimmed by default
}


def retention_family(key: str) -> str:
    """`raw:market:kline_1m` -> `kline`; `raw:user` and an account's `raw:user:a1` -> `user`;
    `raw:conn:user` -> `conn`."""
    key = raw_account(key)[0]
    if key.startswith(CONN_PREFIX):
        return "conn"
    if key.startswith(MARKET_PREFIX):
        fam = strip_tag(key[len(MARKET_PREFIX):])  # cluster mode: `raw:market:{partial}:depth20`
        return "kline" if fam.startswith("kline_") else fam
    if key.startswith(KEY_DEPTH_SNAPSHOTS + ":"):  # cluster mode: `raw:depth_snapshots:{diff}`
        return KEY_DEPTH_SNAPSHOTS[len(RAW_PREFIX):]
    return key[len(RAW_PREFIX):]


def parse_retention(value: str) -> dict[str, Retention]:
    """PIPELINE_RETENTION, e.g. `depth20=200000,aggTrade=age:3600,user=none` over the defaults."""
    out = dict(DEFAULT_RETENTION)
    for item in (p.strip() for p in value.split(",")):
        if not item:
            continue
        fam, sep, spec = item.partition("=")
        if not sep or fam not in DEFAULT_RETENTION:
            raise SettingsError("PIPELINE_RETENTION", f"bad item {item!r}")
        try:
            if spec == "none":
                out[fam] = Retention()
            elif spec.startswith("age:"):
                out[fam] = Retention(max_age_s=float(spec[4:]))
            else:
                out[fam] = Retention(maxlen=int(spec))
        except ValueError:
            raise SettingsError("PIPELINE_RETENTION", f"bad item {item!r}") from None
    return out
