"""The bounded buffer between the websocket readers and the Redis writer.

Pure: imports neither trio nor redis, takes the receipt times it is given.

Why bounded and why it never blocks: a websocket reader that waited for room would stop reading
its socket, trio-websocket's message queue would fill, and the connection would stop answering
the server's pings (Binance drops a connection that has not answered in 10 minutes). So `put`
answers at once: the entry is kept, or it is dropped and counted per raw key with the receipt
times of the first and last drop, so the writer can record a `gap` entry in that key once Redis
takes writes again.

Control entries (opened, closed, silent, gap...) are rare and say what happened to the frames,
so they get a small reserve above the bound: a full buffer of frames does not silence them.
"""

from __future__ import annotations

from collections import deque
from itertools import repeat, starmap
from typing import Any

import attrs

# Room kept for control entries above the frame bound.
CONTROL_RESERVE = 1_000


@attrs.define
class DropRecord:
    """What was dropped for one raw key since the last `take_drops`."""

    count: int = 0
    first_ts: float = 0.0
    last_ts: float = 0.0
    by_conn: dict[str, int] = attrs.field(factory=dict)

    def add(self, ts: float, conn: str) -> None:
        if self.count == 0:
            self.first_ts = ts
        self.count += 1
        self.last_ts = ts
        self.by_conn[conn] = self.by_conn.get(conn, 0) + 1

    def body(self) -> dict[str, Any]:
        """The JSON body of the `gap` control entry that reports this record."""
        return {"reason": "buffer_full", "dropped": self.count,
                "first_recv_ts": round(self.first_ts, 6), "last_recv_ts": round(self.last_ts, 6),
                "by_conn": dict(self.by_conn)}


Item = tuple[str, Any]  # (raw key, entry fields): the buffer does not look inside the fields


class FrameBuffer:
    """FIFO of (key, fields) with a bound on frames and per-key accounting of what it dropped."""

    def __init__(self, bound: int, control_reserve: int = CONTROL_RESERVE) -> None:
        if bound < 1:
            raise ValueError("bound must be at least 1")
        self.bound = bound
        self.control_bound = bound + control_reserve
        self._items: deque[Item] = deque()
        self._drops: dict[str, DropRecord] = {}
        self.accepted = 0  # entries ever put and kept
        self.dropped = 0  # entries ever dropped

    def __len__(self) -> int:
        return len(self._items)

    def put(self, key: str, fields: Any, ts: float, conn: str = "") -> bool:
        """Keep a frame entry if there is room; otherwise count it as dropped. Never blocks."""
        if len(self._items) >= self.bound:
            self.record_drop(key, ts, conn)
            return False
        self._items.append((key, fields))
        self.accepted += 1
        return True

    def put_control(self, key: str, fields: Any, ts: float, conn: str = "") -> bool:
        """Keep a control entry; it may use the reserve above the frame bound."""
        if len(self._items) >= self.control_bound:
            self.record_drop(key, ts, conn)
            return False
        self._items.append((key, fields))
        self.accepted += 1
        return True

    def take(self, max_items: int) -> list[Item]:
        """Up to `max_items` entries, oldest first."""
        n = min(max_items, len(self._items))
        # popleft n times in C: the writer thread holds the GIL for less (one call per batch)
        return list(starmap(self._items.popleft, repeat((), n)))

    def record_drop(self, key: str, ts: float, conn: str = "") -> None:
        """Count one entry for `key` as lost (the buffer was full, or Redis kept refusing it)."""
        self.dropped += 1
        rec = self._drops.get(key)
        if rec is None:
            rec = self._drops[key] = DropRecord()
        rec.add(ts, conn)

    def has_drops(self) -> bool:
        return bool(self._drops)

    def take_drops(self) -> dict[str, DropRecord]:
        """The drop records per raw key since the last call, and forget them."""
        drops, self._drops = self._drops, {}
        return drops
