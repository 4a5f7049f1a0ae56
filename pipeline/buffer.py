"""The bounded buffer between the websocket readers and the Redis writer, and the account of
what was dropped.

Pure: imports neither trio nor redis, takes the receipt times it is given.

Why bounded and why it never blocks: a websocket reader that waited for room would stop reading
its socket, trio-websocket's message queue would fill, and the connection would stop answering
the server's pings (Binance drops a connection that has not answered in 10 minutes). So `put`
answers at once: the entry is kept, or it is dropped and counted.

Two bounds, the first one reached drops: a number of entries (`bound`) and a number of bytes
(`max_bytes`, the packed XADD commands). An entry counts against both from `put` until the
writer `release`s it (written, or given up): entries the writer has taken but Redis has not yet
accepted are still held, so a batch on the wire or entries waiting to be sent again are inside
the bounds, not beside them. Held counts are differences of counters each written by one thread
only (the readers add, the writer thread releases), so neither needs a lock.

Control entries (opened, closed, silent, snapshot...) are rare and say what happened to the
frames, so they get a reserve above both bounds: a full buffer of frames does not silence them.

What is dropped, for any reason, is recorded in the `DropLedger` per raw key and reason, and
stays there until a `gap` entry covering it has been acknowledged by Redis: the writer takes
records out to write them and merges back any that Redis did not accept. The account of a loss
never depends on the gap entry that reports it getting through.
"""

from __future__ import annotations

import threading
from bisect import bisect_right
from collections import deque
from itertools import accumulate, repeat, starmap
from operator import itemgetter

import attrs

from pipeline.eventlog import GAP_BUFFER_FULL, gap_body

# Room kept for control entries above the frame bound.
CONTROL_RESERVE = 1_000
# ... and above the byte bound, as a fraction of it.
CONTROL_RESERVE_BYTES_SHARE = 8  # 1/8 more

Item = tuple[str, bytes]  # (raw key, the entry's packed XADD command)
_size_of = itemgetter(1)


@attrs.define
class DropRecord:
    """What was dropped for one raw key and one reason and is not yet in a written gap."""

    count: int = 0
    first_ts: float = 0.0
    last_ts: float = 0.0
    by_conn: dict[str, int] = attrs.field(factory=dict)

    def add(self, ts: float, conn: str) -> None:
        if self.count == 0:
            self.first_ts = self.last_ts = ts
        else:  # connections' receipt times interleave: a range, not an order
            self.first_ts = min(self.first_ts, ts)
            self.last_ts = max(self.last_ts, ts)
        self.count += 1
        self.by_conn[conn] = self.by_conn.get(conn, 0) + 1

    def merge(self, other: DropRecord) -> None:
        """Fold `other` into this record (a gap entry Redis did not take, put back)."""
        if other.count == 0:
            return
        if self.count == 0:
            self.first_ts, self.last_ts = other.first_ts, other.last_ts
        else:
            self.first_ts = min(self.first_ts, other.first_ts)
            self.last_ts = max(self.last_ts, other.last_ts)
        self.count += other.count
        for conn, n in other.by_conn.items():
            self.by_conn[conn] = self.by_conn.get(conn, 0) + n

    def body(self, reason: str = GAP_BUFFER_FULL) -> dict[str, object]:
        """The JSON body of the `gap` control entry that reports this record."""
        return gap_body(reason, self.count, self.first_ts, self.last_ts, self.by_conn)


DropKey = tuple[str, str]  # (raw key, reason)


class DropLedger:
    """Drops not yet reported, per (raw key, reason). Thread-safe: the readers record buffer
    drops on the Trio thread, the writer thread records entries it gave up and takes records
    out to write them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[DropKey, DropRecord] = {}
        self.recorded = 0  # drops ever recorded
        self.reported = 0  # drops covered by a gap entry Redis acknowledged
        self.abandoned = 0  # drops whose gap entry their own key refuses for good

    def __bool__(self) -> bool:
        return bool(self._records)

    def add(self, key: str, reason: str, ts: float, conn: str = "") -> None:
        with self._lock:
            rec = self._records.get((key, reason))
            if rec is None:
                rec = self._records[(key, reason)] = DropRecord()
            rec.add(ts, conn)
            self.recorded += 1

    def take(self) -> dict[DropKey, DropRecord]:
        """Every record, to be written as gap entries; they are off the ledger until
        `merge`d back (not written) or `reported` (written)."""
        with self._lock:
            records, self._records = self._records, {}
        return records

    def merge(self, key: str, reason: str, rec: DropRecord) -> None:
        """Put back a record whose gap entry Redis did not accept."""
        with self._lock:
            held = self._records.get((key, reason))
            if held is None:
                self._records[(key, reason)] = rec
            else:
                held.merge(rec)

    def report(self, rec: DropRecord) -> None:
        """A gap entry covering `rec` was acknowledged by Redis."""
        with self._lock:
            self.reported += rec.count

    def abandon(self, rec: DropRecord) -> None:
        """A gap entry covering `rec` can never be logged (its key refuses it): reported
        elsewhere (an error log line) instead."""
        with self._lock:
            self.abandoned += rec.count

    @property
    def unreported(self) -> int:
        return self.recorded - self.reported - self.abandoned


class FrameBuffer:
    """FIFO of (key, packed entry) bounded in entries and bytes, with a ledger of drops."""

    def __init__(self, bound: int, max_bytes: int = 256 * 1024 * 1024,
                 control_reserve: int = CONTROL_RESERVE) -> None:
        if bound < 1:
            raise ValueError("bound must be at least 1")
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        self.bound = bound
        self.max_bytes = max_bytes
        self.control_bound = bound + control_reserve
        self.control_bytes = max_bytes + max_bytes // CONTROL_RESERVE_BYTES_SHARE
        self._items: deque[Item] = deque()
        self.drops = DropLedger()
        # written by the readers' thread only
        self.accepted = 0  # entries ever put and kept
        self.bytes_in = 0
        self.rejected = 0  # entries ever dropped for want of room
        # written by the writer's thread only
        self.released = 0  # entries ever written or given up
        self.bytes_out = 0

    def __len__(self) -> int:
        """Entries waiting to be taken (not those the writer holds)."""
        return len(self._items)

    @property
    def held(self) -> int:
        """Entries kept and not yet released: waiting, on the wire, or to be sent again."""
        return self.accepted - self.released

    @property
    def dropped(self) -> int:
        """Entries ever dropped, for any reason (buffer full, given up by the writer)."""
        return self.drops.recorded

    @property
    def bytes_held(self) -> int:
        return self.bytes_in - self.bytes_out

    def put(self, key: str, packed: bytes, ts: float, conn: str = "") -> bool:
        """Keep a frame entry if both bounds leave room; otherwise record it as dropped
        (`buffer_full`). Never blocks."""
        size = len(packed)
        if (self.accepted - self.released >= self.bound
                or self.bytes_in - self.bytes_out + size > self.max_bytes):
            self._reject(key, ts, conn)
            return False
        self._items.append((key, packed))
        self.accepted += 1
        self.bytes_in += size
        return True

    def put_control(self, key: str, packed: bytes, ts: float, conn: str = "") -> bool:
        """Keep a control entry; it may use the reserve above both bounds."""
        size = len(packed)
        if (self.accepted - self.released >= self.control_bound
                or self.bytes_in - self.bytes_out + size > self.control_bytes):
            self._reject(key, ts, conn)
            return False
        self._items.append((key, packed))
        self.accepted += 1
        self.bytes_in += size
        return True

    def _reject(self, key: str, ts: float, conn: str) -> None:
        self.rejected += 1
        self.drops.add(key, GAP_BUFFER_FULL, ts, conn)

    def full(self) -> bool:
        """Entries or bytes held have reached their bound. (Below the byte bound a large frame
        may still find no room: a `rejected` count that moved is the other sign of a full
        buffer.)"""
        return self.held >= self.bound or self.bytes_held >= self.max_bytes

    def take(self, max_items: int, max_bytes: int | None = None) -> list[Item]:
        """Up to `max_items` entries, oldest first, and no more than `max_bytes` of them
        (always at least one). They stay held until `release`d."""
        n = min(max_items, len(self._items))
        # popleft n times in C: the writer thread holds the GIL for less (one call per batch)
        items = list(starmap(self._items.popleft, repeat((), n)))
        # sizes only when the bytes held could pass the budget: not at all in normal running
        if max_bytes is not None and n > 1 and self.bytes_in - self.bytes_out > max_bytes:
            ends = list(accumulate(map(len, map(_size_of, items))))
            if ends[-1] > max_bytes:
                cut = max(1, bisect_right(ends, max_bytes))
                self._items.extendleft(reversed(items[cut:]))  # back at the front, in order
                del items[cut:]
        return items

    def release(self, entries: int, nbytes: int) -> None:
        """Entries the writer is done with (written or given up): their room is free again."""
        self.released += entries
        self.bytes_out += nbytes
