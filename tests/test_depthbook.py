"""The diff-depth book: Binance's documented sequencing, followed exactly.

Pure: no Redis, no trio, no REST. The test plays the shell: it feeds log entries (frames and
`snapshot` control entries) and answers `NeedSnapshot` by appending a snapshot entry.
"""

from __future__ import annotations

import random
from decimal import Decimal
from typing import Any

import orjson
import pytest

from pipeline.eventlog import ControlEntry, FrameEntry
from projections.core.depthbook import DiffBookProjection, State, state_of
from projections.core.outputs import LogGap, NeedSnapshot, PoisonEntry, ViewWrite

RECV = 1_764_000_000.5
SYM = "BTCUSDT"


def event(first: int, last: int, prev: int, bids: Any = (), asks: Any = (),
          symbol: str = SYM) -> FrameEntry:
    data = {"e": "depthUpdate", "E": 1_764_000_000_000 + last, "T": 1_764_000_000_000 + last,
            "s": symbol, "U": first, "u": last, "pu": prev,
            "b": [list(x) for x in bids], "a": [list(x) for x in asks]}
    raw = orjson.dumps({"stream": f"{symbol.lower()}@depth@100ms", "data": data})
    return FrameEntry(b"1-0", raw, RECV, "c", last)


def snapshot(last_update_id: int, bids: Any, asks: Any, symbol: str = SYM) -> ControlEntry:
    body = {"symbol": symbol, "response": {
        "lastUpdateId": last_update_id, "E": 1_764_000_000_000 + last_update_id,
        "T": 1_764_000_000_000 + last_update_id,
        "bids": [list(x) for x in bids], "asks": [list(x) for x in asks]}}
    return ControlEntry(b"1-0", "snapshot", body, RECV, "")


def book_of(outputs: list) -> dict[str, Any]:
    writes = [o for o in outputs if isinstance(o, ViewWrite)]
    assert writes, f"no book published in {outputs!r}"
    return orjson.loads(writes[-1].value)


def kinds(outputs: list) -> list[str]:
    return [type(o).__name__ for o in outputs]


SNAP_BIDS = [("100.0", "1"), ("99.5", "2"), ("99.0", "3")]
SNAP_ASKS = [("100.5", "1"), ("101.0", "2")]


def test_first_event_asks_for_a_snapshot_once_and_is_buffered() -> None:
    fold = DiffBookProjection("websocket")
    assert fold.apply(event(95, 98, 94)) == [NeedSnapshot(SYM, "start")]
    assert fold.apply(event(99, 101, 98)) == []
    assert state_of(fold, SYM) is State.AWAITING_SNAPSHOT


def test_snapshot_aligns_with_buffered_events_and_publishes_the_book() -> None:
    fold = DiffBookProjection("websocket", book_depth=2)
    fold.apply(event(90, 94, 89, bids=[("100.0", "9")]))  # u < lastUpdateId: dropped
    fold.apply(event(95, 101, 94, bids=[("99.5", "5")], asks=[("100.5", "0")]))  # straddles
    fold.apply(event(102, 104, 101, bids=[("100.2", "1")]))
    out = fold.apply(snapshot(100, SNAP_BIDS, SNAP_ASKS))
    assert kinds(out) == ["ViewWrite"]
    w = out[0]
    assert isinstance(w, ViewWrite)
    assert w.key == "websocket:orderbook:btcusdt:2"
    assert (w.version, w.version_field) == (104, "last_update_id")
    assert w.expire_at_ms == int(RECV * 1000) + 60_000
    assert orjson.loads(w.value) == {
        "bids": [["100.2", "1"], ["100.0", "1"]], "asks": [["101.0", "2"]],
        "timestamp": (1_764_000_000_000 + 104) / 1000, "last_update_id": 104,
        "source": "websocket"}
    assert state_of(fold, SYM) is State.LIVE


def test_snapshot_with_nothing_buffered_is_published_and_next_event_must_straddle_it() -> None:
    fold = DiffBookProjection("w")
    out = fold.apply(snapshot(100, SNAP_BIDS, SNAP_ASKS))
    assert book_of(out)["last_update_id"] == 100
    assert fold.apply(event(90, 99, 89, bids=[("1.0", "1")])) == []  # older than the snapshot
    out = fold.apply(event(100, 103, 99, asks=[("100.5", "7")]))
    assert book_of(out)["asks"][0] == ["100.5", "7"]


def test_snapshot_older_than_every_buffered_event_asks_again() -> None:
    fold = DiffBookProjection("w")
    fold.apply(event(120, 125, 119))
    out = fold.apply(snapshot(100, SNAP_BIDS, SNAP_ASKS))
    assert out == [NeedSnapshot(SYM, "snapshot older than the stream")]
    assert state_of(fold, SYM) is State.RESYNC_NEEDED
    out = fold.apply(snapshot(122, SNAP_BIDS, SNAP_ASKS))
    assert book_of(out)["last_update_id"] == 125


def test_pu_break_records_a_gap_asks_for_a_snapshot_and_recovers_from_the_next_one() -> None:
    fold = DiffBookProjection("w")
    fold.apply(snapshot(100, SNAP_BIDS, SNAP_ASKS))
    fold.apply(event(99, 105, 98))
    out = fold.apply(event(111, 115, 110, bids=[("98.0", "4")]))  # 106..110 never arrived
    assert out == [LogGap("raw:depth_snapshots", {"symbol": SYM, "reason": "pu break",
                                                  "expected_pu": 105, "pu": 110, "U": 111,
                                                  "u": 115}),
                   NeedSnapshot(SYM, "gap")]
    assert state_of(fold, SYM) is State.RESYNC_NEEDED
    assert fold.apply(event(116, 118, 115, bids=[("97.0", "1")])) == []  # buffered, asked once
    # the shell's gap entry comes back through the log: nothing to do
    gap = out[0]
    assert isinstance(gap, LogGap)
    assert fold.apply(ControlEntry(b"2-0", "gap", gap.body, RECV, "")) == []
    out = fold.apply(snapshot(113, [("100.0", "1"), ("98.0", "4")], [("100.5", "1")]))
    book = book_of(out)
    assert book["last_update_id"] == 118
    assert book["bids"] == [["100.0", "1"], ["98.0", "4"], ["97.0", "1"]]
    assert state_of(fold, SYM) is State.LIVE


def test_duplicate_events_are_ignored() -> None:
    fold = DiffBookProjection("w")
    fold.apply(snapshot(100, SNAP_BIDS, SNAP_ASKS))
    first = fold.apply(event(99, 105, 98, bids=[("99.9", "1")]))
    fold.apply(event(106, 108, 105))
    assert fold.apply(event(99, 105, 98, bids=[("99.9", "1")])) == []
    assert fold.apply(event(106, 108, 105)) == []
    assert state_of(fold, SYM) is State.LIVE
    assert book_of(first)["bids"][1] == ["99.9", "1"]


def test_quantity_zero_removes_a_level_and_removing_an_absent_level_is_harmless() -> None:
    fold = DiffBookProjection("w")
    fold.apply(snapshot(100, SNAP_BIDS, SNAP_ASKS))
    out = fold.apply(event(100, 101, 99, bids=[("100.0", "0"), ("42.0", "0.000")],
                           asks=[("100.50", "0.5")]))
    book = book_of(out)
    assert book["bids"] == [["99.5", "2"], ["99.0", "3"]]
    assert book["asks"] == [["100.50", "0.5"], ["101.0", "2"]]  # same price, newest string


def test_a_snapshot_while_live_and_aligned_is_ignored() -> None:
    fold = DiffBookProjection("w")
    fold.apply(snapshot(100, SNAP_BIDS, SNAP_ASKS))
    fold.apply(event(100, 101, 99))
    assert fold.apply(snapshot(101, [("1.0", "1")], [("2.0", "1")])) == []
    assert book_of(fold.apply(event(102, 103, 101)))["bids"][0] == ["100.0", "1"]


def test_full_buffer_drops_the_oldest_counts_them_and_asks_again() -> None:
    fold = DiffBookProjection("w", buffer_limit=3)
    outs = []
    for i in range(7):
        outs += fold.apply(event(10 * i + 1, 10 * i + 10, 10 * i))
    assert outs == [NeedSnapshot(SYM, "start"),
                    NeedSnapshot(SYM, "no snapshot after a full buffer of events")]
    seq = fold.sequencers[SYM]
    assert seq.dropped == 4
    assert [e.final_id for e in seq.buffer] == [50, 60, 70]


def test_symbols_are_sequenced_independently() -> None:
    fold = DiffBookProjection("w")
    fold.apply(snapshot(100, SNAP_BIDS, SNAP_ASKS))
    assert fold.apply(event(5, 6, 4, symbol="ETHUSDT")) == [NeedSnapshot("ETHUSDT", "start")]
    assert state_of(fold, SYM) is State.LIVE
    assert state_of(fold, "ETHUSDT") is State.AWAITING_SNAPSHOT


@pytest.mark.parametrize("entry", [
    event(1, 2, 0, bids=[("abc", "1")]),
    event(1, 2, 0, bids=[("1.0",)]),
    event(1, 2, 0, asks=[("1.0", None)]),
    FrameEntry(b"1-0", b'{"stream":"btcusdt@depth","data":{"e":"depthUpdate","s":"BTCUSDT"}}',
               RECV, "c", 1),
    ControlEntry(b"1-0", "snapshot", {"symbol": SYM, "response": {"code": -1003}}, RECV, ""),
])
def test_malformed_entries_are_poison_and_leave_the_book_untouched(entry: Any) -> None:
    fold = DiffBookProjection("w")
    fold.apply(snapshot(100, SNAP_BIDS, SNAP_ASKS))
    with pytest.raises(PoisonEntry):
        fold.apply(entry)
    out = fold.apply(event(100, 101, 99))
    assert book_of(out)["bids"] == [list(x) for x in SNAP_BIDS]


# --- the property: any log, any faults, the published book is the exchange's book -----------

class Exchange:
    """An independent reference: the true book after each event, kept with Decimal prices."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.u = 1000
        self.bids: dict[Decimal, str] = {}
        self.asks: dict[Decimal, str] = {}
        self.history: dict[int, tuple[dict[Decimal, str], dict[Decimal, str]]] = {}
        for _ in range(8):
            self._change()
        self.history[self.u] = (dict(self.bids), dict(self.asks))

    def _change(self) -> tuple[str, list[tuple[str, str]]]:
        bid = self.rng.random() < 0.5
        side = self.bids if bid else self.asks
        price = Decimal(self.rng.randrange(9000, 9040) if bid else self.rng.randrange(9040, 9080))
        price = price / 10
        text = f"{price:.{self.rng.choice((1, 2))}f}"  # the same price written two ways
        qty = "0" if self.rng.random() < 0.3 else str(self.rng.randrange(1, 500) / 100)
        if qty == "0":
            side.pop(price, None)
        else:
            side[price] = qty
        return ("b" if bid else "a"), [(text, qty)]

    def next_event(self) -> FrameEntry:
        prev = self.u
        first = prev + 1
        self.u = first + self.rng.randrange(0, 3)
        bids: list[tuple[str, str]] = []
        asks: list[tuple[str, str]] = []
        for _ in range(self.rng.randrange(1, 5)):
            which, levels = self._change()
            (bids if which == "b" else asks).extend(levels)
        self.history[self.u] = (dict(self.bids), dict(self.asks))
        return event(first, self.u, prev, bids, asks)

    def snapshot_at(self, u: int) -> ControlEntry:
        bids, asks = self.history[u]
        return snapshot(u, [(str(p), q) for p, q in bids.items()],
                        [(str(p), q) for p, q in asks.items()])

    def book_at(self, u: int) -> tuple[list[tuple[Decimal, Decimal]], ...]:
        bids, asks = self.history[u]
        return (sorted(((p, Decimal(q)) for p, q in bids.items()), reverse=True),
                sorted((p, Decimal(q)) for p, q in asks.items()))


def as_decimal(levels: list[list[str]]) -> list[tuple[Decimal, Decimal]]:
    return [(Decimal(p), Decimal(q)) for p, q in levels]


def run_faulty_log(seed: int) -> tuple[DiffBookProjection, Exchange, list[ViewWrite], bool]:
    """Feed a log with lost events, duplicates, and snapshots that arrive late and stale; then
    a quiet tail in which asked-for snapshots are current. Returns the fold, the exchange,
    every published book, and whether the exchange's last event reached the log."""
    rng = random.Random(seed)
    ex = Exchange(rng)
    fold = DiffBookProjection("w", book_depth=1000, buffer_limit=rng.choice((4, 50)))
    published: list[ViewWrite] = []
    due: list[tuple[int, int]] = []  # (log step at which the snapshot is appended, staleness)
    recent: list[FrameEntry] = []
    n = rng.randrange(20, 120)
    last_delivered = False
    for step in range(n + 40):
        entries: list[Any] = []
        if step < n:
            ev = ex.next_event()
            roll = rng.random()
            last_delivered = roll >= 0.04
            if last_delivered:
                entries.append(ev)
                if roll < 0.12 and recent:
                    entries.append(rng.choice(recent))  # a duplicate from a retried XADD
            recent = [*recent[-5:], ev]
        for _, stale in [d for d in due if d[0] == step]:
            # taken a few events before it reaches the log (those events are buffered)
            us = sorted(ex.history)
            entries.append(ex.snapshot_at(us[max(0, len(us) - 1 - stale)]))
        due = [d for d in due if d[0] != step]
        for entry in entries:
            for out in fold.apply(entry):
                if isinstance(out, ViewWrite):
                    published.append(out)
                elif isinstance(out, NeedSnapshot):
                    stale = rng.choice((0, 0, 1, 3)) if step < n else 0
                    due.append((step + rng.randrange(1, 6), stale))
    return fold, ex, published, last_delivered


@pytest.mark.parametrize("seed", range(300))
def test_every_published_book_equals_the_exchanges_book_at_its_update_id(seed: int) -> None:
    fold, ex, published, last_delivered = run_faulty_log(seed)
    for w in published:
        view = orjson.loads(w.value)
        assert view["last_update_id"] == w.version
        bids, asks = ex.book_at(int(w.version))
        assert as_decimal(view["bids"]) == bids
        assert as_decimal(view["asks"]) == asks
    # the quiet tail answered every request with a current snapshot: the book is live again
    assert state_of(fold, SYM) is State.LIVE
    if last_delivered:
        assert published[-1].version == ex.u


def test_a_replay_of_the_same_log_publishes_the_same_books() -> None:
    rng = random.Random(7)
    ex = Exchange(rng)
    log: list[Any] = [ex.next_event() for _ in range(5)]
    log.append(ex.snapshot_at(sorted(ex.history)[-3]))
    log += [ex.next_event() for _ in range(30)]
    live, again = DiffBookProjection("w"), DiffBookProjection("w")
    outputs = [o for e in log for o in live.apply(e)]
    assert sum(isinstance(o, ViewWrite) for o in outputs) == 31
    assert outputs == [o for e in log for o in again.apply(e)]


# --- events no stream can send (projections.core.plausible) -----------------------------------

def crafted(first: int, last: int, prev: int, *, e_ms: int = 1_764_000_000_400,
            stream: str = "btcusdt@depth@100ms", **data: Any) -> FrameEntry:
    body = {"e": "depthUpdate", "E": e_ms, "T": e_ms, "s": SYM, "U": first, "u": last,
            "pu": prev, "b": [["100.1", "1"]], "a": [], **data}
    return FrameEntry(b"1-0", orjson.dumps({"stream": stream, "data": body}), RECV, "c", 1)


def test_a_u_jump_no_stream_can_make_is_poison_and_the_book_goes_on_unbroken() -> None:
    fold = DiffBookProjection("websocket")
    fold.apply(event(95, 98, 94))
    fold.apply(snapshot(100, SNAP_BIDS, SNAP_ASKS))
    assert kinds(fold.apply(event(99, 101, 98))) == ["ViewWrite"]  # aligned at u 101
    for u in (101 + 10**12, 2**53 - 1):
        with pytest.raises(PoisonEntry, match="PIPELINE_MAX_ID_RATE"):
            fold.apply(crafted(102, u, 101))
    with pytest.raises(PoisonEntry, match=r"outside \[0, 2\^53\)"):
        fold.apply(crafted(102, 2**63 - 1, 101))
    assert book_of(fold.apply(event(102, 105, 101, bids=[("99.9", "4")])))["last_update_id"] \
        == 105  # no gap, no new snapshot: the sequencer never moved on the poison
    assert state_of(fold, SYM) is State.LIVE


@pytest.mark.parametrize(("entry", "reason"), [
    (crafted(99, 101, 98, e_ms=1_764_000_011_000), "PIPELINE_MAX_CLOCK_AHEAD_S"),
    (crafted(99, 101, 98, s="ETHUSDT"), "is not the stream's BTCUSDT"),
    (crafted(99, 101, 98, stream="btcusdt@depth20@100ms"), "not a diff-depth stream"),
    (crafted(99, 101, 98, b=[["100.1", 1]]), "decimal strings"),
    (crafted(99, 101, 98, b=[["1e2", "1"]]), "decimal strings"),
])
def test_an_implausible_diff_event_is_poison(entry: FrameEntry, reason: str) -> None:
    with pytest.raises(PoisonEntry, match=reason):
        DiffBookProjection("websocket").apply(entry)


def test_a_symbol_not_configured_gets_no_book() -> None:
    [out] = DiffBookProjection("websocket", symbols=["ETHUSDT"]).apply(event(95, 98, 94))
    assert "PIPELINE_SYMBOLS" in getattr(out, "event_type", "")


def test_a_snapshot_from_beyond_the_clock_bound_is_poison() -> None:
    snap = snapshot(100, SNAP_BIDS, SNAP_ASKS)
    snap.body["response"]["E"] = 1_764_000_020_000
    with pytest.raises(PoisonEntry, match="PIPELINE_MAX_CLOCK_AHEAD_S"):
        DiffBookProjection("websocket").apply(snap)
