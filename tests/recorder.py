"""An in-memory `FrameSink` for the tests that run a connection on Trio's MockClock: no writer
thread, no Redis, so nothing the clock could jump under."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
import trio


@attrs.frozen
class Seen:
    """One entry a connection handed to its sink, with the trio time it did."""

    at: float
    key: str
    conn: str
    seq: int = 0  # frames
    frame: bytes = b""
    ctl: str = ""  # control entries
    body: Mapping[str, Any] = attrs.field(factory=dict)


class Recorder:
    """A `FrameSink` that keeps every entry in memory, in the order it came."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self._ctl: list[Seen] = []
        self._changed = trio.Event()

    def append_frame(self, key: str, frame: bytes, recv_ts: float, conn: str, seq: int) -> bool:
        self._add(Seen(trio.current_time(), key, conn, seq, frame))
        return True

    def append_control(self, key: str, ctl: str, body: Mapping[str, Any], conn: str = ""
                       ) -> bool:
        seen = Seen(trio.current_time(), key, conn, ctl=ctl, body=dict(body))
        self._ctl.append(seen)
        self._add(seen)
        return True

    def _add(self, seen: Seen) -> None:
        self.seen.append(seen)
        self._changed.set()
        self._changed = trio.Event()

    async def until(self, check: Callable[[], Any], within: float) -> Any:
        """Wait until `check()` is truthy, re-checking after each entry; `within` is in the
        trio clock's seconds (virtual on the MockClock)."""
        with trio.fail_after(within):
            while not (result := check()):
                await self._changed.wait()
        return result

    def frames(self, key: str | None = None) -> list[Seen]:
        return [e for e in self.seen if not e.ctl and (key is None or e.key == key)]

    def controls(self, ctl: str) -> list[Seen]:
        return [e for e in self._ctl if e.ctl == ctl]

    def reasons(self) -> dict[str, str]:
        return {c.conn: c.body["reason"] for c in self.controls("closed")}
