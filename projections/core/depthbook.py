"""The diff-depth book: Binance's sequencing as a small state machine, and the fold using it.

Pure: imports neither trio nor redis, and never calls REST.

Theory of operation
-------------------
`@depth@100ms` sends, per symbol, events that each carry the absolute quantities of the price
levels that changed (quantity "0" removes a level), the range of book update ids they cover
(`U` first, `u` last) and `pu`, the `u` of the symbol's previous event. A local book built
from them is only right if it starts from a REST snapshot (`lastUpdateId`) and no event is
missed after it. Binance documents the procedure; this module follows it, one `Sequencer` per
symbol, in three states:

    AWAITING_SNAPSHOT  no book yet. Events are buffered. The first event asks for a snapshot
                       (`NeedSnapshot(symbol, "start")`).
    LIVE               a snapshot is loaded. Until the first event is applied ("aligned"),
                       events with u < lastUpdateId are dropped and the first applied one must
                       have U <= lastUpdateId <= u (or pu == lastUpdateId: it follows the
                       snapshot directly). After that every event's pu must equal the
                       previous u; an event with u <= the last applied u is a duplicate
                       (a retried XADD, a redelivery) and is ignored.
    RESYNC_NEEDED      the sequence broke: a pu that is not the previous u (a `LogGap` is
                       recorded and a snapshot asked for), or a snapshot older than every
                       buffered event. Events are buffered again, exactly as before the first
                       snapshot.

Snapshots do not come from this module: the projection says `NeedSnapshot`, the shell fetches
`GET /fapi/v1/depth` and appends the answer to the log as a `snapshot` control entry, and the
projection reads it from there like any other entry. So the book depends only on the log, and
a replay of the same log builds the same book. A snapshot in AWAITING_SNAPSHOT or
RESYNC_NEEDED is loaded and the buffer is replayed through the LIVE rules; a snapshot that
arrives while LIVE and aligned is ignored (the book is already exact; it was asked for
earlier, or by a previous process).

Snapshots and the `gap` entries of `LogGap` go to a stream of their own, `raw:depth_snapshots`
(`SNAPSHOT_KEY`), that only the projector writes, not to the ingestor's `raw:market:depth`:
neither can then trim or block the other's stream. The projection reads both keys, whose
entries interleave differently in a live batch (read key by key) and in a replay (merged by
id). The sequencer does not depend on it: until a snapshot it buffers every event, loading
one replays the buffer through the LIVE rules, and those rules drop the events older than the
snapshot that come after it.

The buffer is bounded (`buffer_limit`): past it the oldest events are dropped and counted; if
a whole buffer's worth of events passes without a snapshot, the snapshot is asked for again.

An event no stream can send is poison before it reaches the sequencer, which then never moves
on its account (`projections.core.plausible`): a payload symbol other than the stream's, an
event time later than the entry's receipt + PIPELINE_MAX_CLOCK_AHEAD_S, ids outside [0, 2^53),
levels that are not decimal strings, and, once LIVE and aligned, a `u` further past the last
applied one than PIPELINE_MAX_ID_RATE ids a second could carry it (`u` = 2^53 - 1 would
otherwise become the book's last id, and every real event would look like a gap).

Every transition is in `Sequencer`: `_TRANSITIONS` names which state may follow which, and
`_HANDLERS` maps (state, input) to the one method that handles it.
"""

from __future__ import annotations

import enum
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import orjson

from pipeline.eventlog import ControlEntry, FrameEntry
from projections.core import frames
from projections.core.keys import KEY_DEPTH_SNAPSHOTS, Keys, depth_snapshots_key, market_key
from projections.core.market import SOURCE, STREAM_CACHE_MAX, TTL_MS
from projections.core.outputs import (
    Entry,
    LogGap,
    NeedSnapshot,
    Output,
    PoisonEntry,
    Unrecognized,
    ViewWrite,
)
from projections.core.plausible import Bounds

RAW_KEY = market_key("depth")  # diff-depth frames, appended by the market ingestor
SNAPSHOT_KEY = KEY_DEPTH_SNAPSHOTS  # snapshot and gap entries, appended by the projector
DEFAULT_BUFFER_LIMIT = 1000  # 100 s of events at 100 ms: far more than a snapshot round trip


class State(enum.Enum):
    AWAITING_SNAPSHOT = "awaiting_snapshot"
    LIVE = "live"
    RESYNC_NEEDED = "resync_needed"


_TRANSITIONS: dict[State, frozenset[State]] = {
    State.AWAITING_SNAPSHOT: frozenset({State.AWAITING_SNAPSHOT, State.LIVE}),
    State.LIVE: frozenset({State.LIVE, State.RESYNC_NEEDED}),
    State.RESYNC_NEEDED: frozenset({State.RESYNC_NEEDED, State.LIVE}),
}


@attrs.define
class Step:
    """What one input asks of the book and of the shell, in order: load `snapshot` (if any),
    apply `apply`, then emit `need_snapshot` (a reason) and `gap` (a LogGap body)."""

    snapshot: frames.DepthSnapshot | None = None
    apply: list[frames.DiffDepth] = attrs.Factory(list)
    need_snapshot: str | None = None
    gap: dict[str, Any] | None = None

    def merge(self, later: Step) -> None:
        self.apply.extend(later.apply)
        self.need_snapshot = later.need_snapshot or self.need_snapshot
        self.gap = later.gap or self.gap


class Sequencer:
    """One symbol's diff-depth sequencing. Decides; does not hold the book."""

    def __init__(self, symbol: str, buffer_limit: int = DEFAULT_BUFFER_LIMIT) -> None:
        self.symbol = symbol
        self.state = State.AWAITING_SNAPSHOT
        self.buffer: deque[frames.DiffDepth] = deque()
        self.buffer_limit = buffer_limit
        self.dropped = 0  # events dropped from a full buffer, ever (for the operator)
        self.last_u = 0  # last applied u, or the snapshot's lastUpdateId before alignment
        self.last_ms = 0  # event time of last_u (0: unknown, a snapshot without E)
        self.aligned = False  # the first event after the snapshot has been applied
        self._asked = False  # a snapshot was asked for in this waiting period
        self._dropped_since_ask = 0

    # --- inputs ----------------------------------------------------------------------------

    def on_event(self, ev: frames.DiffDepth) -> Step:
        return _HANDLERS[self.state, "event"](self, ev)

    def on_snapshot(self, snap: frames.DepthSnapshot) -> Step:
        return _HANDLERS[self.state, "snapshot"](self, snap)

    # --- handlers: the whole state machine ---------------------------------------------------

    def _buffer_event(self, ev: frames.DiffDepth) -> Step:
        """AWAITING_SNAPSHOT / RESYNC_NEEDED + event: keep it for after the snapshot."""
        if len(self.buffer) >= self.buffer_limit:
            self.buffer.popleft()
            self.dropped += 1
            self._dropped_since_ask += 1
        self.buffer.append(ev)
        if not self._asked:
            self._asked = True
            return Step(need_snapshot="start")
        if self._dropped_since_ask >= self.buffer_limit:
            self._dropped_since_ask = 0
            return Step(need_snapshot="no snapshot after a full buffer of events")
        return Step()

    def _load_snapshot(self, snap: frames.DepthSnapshot) -> Step:
        """AWAITING_SNAPSHOT / RESYNC_NEEDED + snapshot (or LIVE before alignment): load it,
        then put the buffered events through the LIVE rules."""
        self._goto(State.LIVE)
        self.last_u = snap.last_update_id
        self.last_ms = snap.event_time or 0
        self.aligned = False
        self._asked = False
        self._dropped_since_ask = 0
        step = Step(snapshot=snap)
        pending = list(self.buffer)
        self.buffer.clear()
        for i, ev in enumerate(pending):
            step.merge(self._live_event(ev))
            if self.state is not State.LIVE:
                self.buffer.extend(pending[i + 1:])  # the failing event is already buffered
                break
        return step

    def _live_snapshot(self, snap: frames.DepthSnapshot) -> Step:
        """LIVE + snapshot: a newer snapshot replaces one not yet aligned; an aligned book is
        exact already."""
        if self.aligned:
            return Step()
        return self._load_snapshot(snap)

    def _live_event(self, ev: frames.DiffDepth) -> Step:
        """LIVE + event: apply, drop, ignore, or break the sequence."""
        if self.aligned:
            if ev.final_id <= self.last_u:
                return Step()  # duplicate
            if ev.prev_final_id == self.last_u:
                self.last_u, self.last_ms = ev.final_id, ev.event_time
                return Step(apply=[ev])
            gap = {"symbol": self.symbol, "reason": "pu break", "expected_pu": self.last_u,
                   "pu": ev.prev_final_id, "U": ev.first_id, "u": ev.final_id}
            return self._resync(ev, "gap", gap)
        if ev.final_id < self.last_u:
            return Step()  # older than the snapshot
        # Binance: the first applied event has U <= lastUpdateId <= u. An event whose pu is
        # lastUpdateId follows the snapshot directly, so it is as good (futures ids skip).
        if ev.first_id <= self.last_u or ev.prev_final_id == self.last_u:
            self.aligned = True
            self.last_u, self.last_ms = ev.final_id, ev.event_time
            return Step(apply=[ev])
        return self._resync(ev, "snapshot older than the stream", None)

    def _resync(self, ev: frames.DiffDepth, reason: str, gap: dict[str, Any] | None) -> Step:
        self._goto(State.RESYNC_NEEDED)
        self.aligned = False
        self._asked = True
        self._dropped_since_ask = 0
        self.buffer.append(ev)
        return Step(need_snapshot=reason, gap=gap)

    def _goto(self, new: State) -> None:
        if new not in _TRANSITIONS[self.state]:
            raise AssertionError(f"depth sequencer: {self.state.name} -> {new.name}")
        self.state = new


_HANDLERS: dict[tuple[State, str], Callable[[Sequencer, Any], Step]] = {
    (State.AWAITING_SNAPSHOT, "event"): Sequencer._buffer_event,
    (State.AWAITING_SNAPSHOT, "snapshot"): Sequencer._load_snapshot,
    (State.LIVE, "event"): Sequencer._live_event,
    (State.LIVE, "snapshot"): Sequencer._live_snapshot,
    (State.RESYNC_NEEDED, "event"): Sequencer._buffer_event,
    (State.RESYNC_NEEDED, "snapshot"): Sequencer._load_snapshot,
}


class BookSide:
    """Price levels of one side, best first, as two parallel lists: sort keys (the price as a
    float, negated for bids) and (price, qty) as sent. Publishing the top levels is then one
    slice; no dict, whose scattered lookups cost more than the bisect on a book of ~1000
    levels. Prices and quantities stay the strings sent."""

    __slots__ = ("keys", "vals")

    def __init__(self) -> None:
        self.keys: list[float] = []
        self.vals: list[tuple[str, str]] = []

    def load(self, levels: Iterable[frames.Level]) -> None:
        held = {key: (price, qty) for key, price, qty, zero in levels if not zero}
        self.keys = sorted(held)
        self.vals = [held[k] for k in self.keys]

    def update(self, levels: Iterable[frames.Level]) -> None:
        keys, vals = self.keys, self.vals
        for key, price, qty, zero in levels:
            i = bisect_left(keys, key)
            if i < len(keys) and keys[i] == key:
                if zero:
                    del keys[i]
                    del vals[i]
                else:
                    vals[i] = (price, qty)
            elif not zero:  # removing a level the book does not hold is normal (Binance)
                keys.insert(i, key)
                vals.insert(i, (price, qty))

    def top(self, n: int) -> list[tuple[str, str]]:
        return self.vals[:n]


class Book:
    __slots__ = ("asks", "bids")

    def __init__(self) -> None:
        self.bids = BookSide()
        self.asks = BookSide()


class DiffBookProjection:
    """`P:orderbook:{symbol}:{book_depth}` from the diff-depth stream, with a full local book
    per symbol kept in memory (hence exclusive: one process at a time holds the lease).

    Options: `book_depth` (levels published per side, default 20), `buffer_limit`, `symbols`
    (the configured ones; None: any well-formed symbol), `bounds` (`plausible.Bounds`).
    """

    name = "depth_book"
    exclusive = True

    def __init__(self, prefix: str, *, book_depth: int = 20,
                 buffer_limit: int = DEFAULT_BUFFER_LIMIT, symbols: Iterable[str] | None = None,
                 bounds: Bounds | None = None, **_unused: object) -> None:
        # the cluster layout tags both (`keys.depth_snapshots_key`): built when the fold is
        self.sources = [market_key("depth"), depth_snapshots_key()]
        self.book_depth = book_depth
        self.buffer_limit = buffer_limit
        self.bounds = bounds or Bounds()
        self.symbols = frozenset(symbols) if symbols is not None else None
        # stream name -> (its symbol, "" when not configured; the wrapper's first bytes)
        self._streams: dict[str, tuple[str, bytes]] = {}
        self._key = Keys(prefix).view_head("orderbook")
        self._suffix = f":{book_depth}"
        self.sequencers: dict[str, Sequencer] = {}
        self.books: dict[str, Book] = {}

    def apply(self, entry: Entry) -> list[Output]:
        limit_ms = self.bounds.time_limit_ms(entry.recv_ts)
        if type(entry) is ControlEntry:
            if entry.ctl != "snapshot":
                return []  # opened/closed/gap (our own LogGap read back) ...
            snap = frames.depth_snapshot(entry.body, limit_ms)
            return self._perform(snap.symbol, self._sequencer(snap.symbol).on_snapshot(snap),
                                 entry.recv_ts)
        assert type(entry) is FrameEntry
        got = frames.unwrap(entry.frame)
        if got is None or frames.event_type(got[1]) != "depthUpdate":
            return []
        symbol = self._stream_symbol(got[0], entry.frame)
        if symbol is None:
            return [Unrecognized("depthUpdate: symbol not in PIPELINE_SYMBOLS")]
        ev = frames.diff_depth(got[1], symbol, limit_ms)  # parsed in full before any state changes
        seq = self._sequencer(symbol)
        if (seq.state is State.LIVE and seq.aligned and seq.last_ms
                and not self.bounds.id_jump_ok(seq.last_u, seq.last_ms, ev.final_id,
                                               ev.event_time)):
            raise PoisonEntry(f"depthUpdate: u jumps from {seq.last_u} to {ev.final_id} in "
                              f"{ev.event_time - seq.last_ms} ms, past PIPELINE_MAX_ID_RATE")
        return self._perform(symbol, seq.on_event(ev), entry.recv_ts)

    def _stream_symbol(self, stream: str, frame: bytes) -> str | None:
        """The symbol of a diff-depth stream (`btcusdt@depth@100ms`), None when it is not
        configured; PoisonEntry for a frame of another stream or routed by another name."""
        known = self._streams.get(stream)
        if known is None:
            parts = stream.split("@")
            symbol = frames.stream_symbol(stream)
            if symbol is None or len(parts) < 2 or parts[1] != "depth":
                raise PoisonEntry(f"depthUpdate: {stream[:60]!r} is not a diff-depth stream")
            if len(self._streams) >= STREAM_CACHE_MAX:
                self._streams.clear()
            configured = self.symbols is None or symbol in self.symbols
            known = self._streams[stream] = (symbol if configured else "",
                                             b'{"stream":"%s"' % stream.encode())
        if not frame.startswith(known[1]):
            raise PoisonEntry(f"depthUpdate: the frame names a stream before {stream[:60]!r}")
        return known[0] or None

    def _sequencer(self, symbol: str) -> Sequencer:
        seq = self.sequencers.get(symbol)
        if seq is None:
            seq = self.sequencers[symbol] = Sequencer(symbol, self.buffer_limit)
        return seq

    def _perform(self, symbol: str, step: Step, recv_ts: float) -> list[Output]:
        out: list[Output] = []
        book = self.books.get(symbol)
        if book is None:
            book = self.books[symbol] = Book()
        if step.snapshot is not None:
            book.bids.load(step.snapshot.bids)
            book.asks.load(step.snapshot.asks)
        for ev in step.apply:
            book.bids.update(ev.bids)
            book.asks.update(ev.asks)
        if step.gap is not None:
            out.append(LogGap(self.sources[1], step.gap))
        if step.need_snapshot is not None:
            out.append(NeedSnapshot(symbol, step.need_snapshot))
        seq = self.sequencers[symbol]
        if seq.state is State.LIVE and (step.apply or step.snapshot is not None):
            out.append(self._publish(symbol, book, step, seq.last_u, recv_ts))
        return out

    def _publish(self, symbol: str, book: Book, step: Step, version: int,
                 recv_ts: float) -> ViewWrite:
        if step.apply:
            ts = step.apply[-1].event_time / 1000
        else:
            snap = step.snapshot
            assert snap is not None
            ts = snap.event_time / 1000 if snap.event_time is not None else recv_ts
        value = orjson.dumps({
            "bids": book.bids.top(self.book_depth), "asks": book.asks.top(self.book_depth),
            "timestamp": ts, "last_update_id": version, "source": SOURCE,
        })
        return ViewWrite(self._key + symbol.lower() + self._suffix, value, version,
                         "last_update_id", int(recv_ts * 1000) + TTL_MS, ts, True)


def state_of(projection: DiffBookProjection, symbol: str) -> State | None:
    """The sequencer state of `symbol` (for status output and tests); None if never seen."""
    seq = projection.sequencers.get(symbol.upper())
    return seq.state if seq is not None else None

