"""Exponential backoff with jitter: the websocket reconnects, the Redis writer, the projector.

Pure. Jitter keeps many connections (or several processes) that failed together from all
coming back in the same instant.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import attrs


def backoff_delay(attempt: int, base: float, cap: float, rand: Callable[[], float]) -> float:
    """Seconds to wait before retry number `attempt` (1, 2, ...): a random value in
    [c/2, c] where c = base * 2**(attempt-1), capped at `cap`."""
    ceiling = min(cap, base * 2 ** max(0, min(attempt - 1, 30)))
    return ceiling * (0.5 + 0.5 * rand())


@attrs.define
class Backoff:
    """The waits of one retry loop: `next_delay()` after each failure, `reset()` after a
    success. Pure: the caller sleeps (trio.sleep in the projector, an Event wait in the writer
    thread). `failing` says whether the last attempt failed, for logging an outage once."""

    base: float
    cap: float
    rand: Callable[[], float] = random.random
    attempt: int = 0

    @property
    def failing(self) -> bool:
        return self.attempt > 0

    def next_delay(self) -> float:
        self.attempt += 1
        return backoff_delay(self.attempt, self.base, self.cap, self.rand)

    def reset(self) -> bool:
        """Back to no wait; True when it was failing (an outage just ended)."""
        was, self.attempt = self.attempt > 0, 0
        return was


@attrs.define
class BatchRetry:
    """The log writer's retry rules. Pure: the writer thread sleeps.

    While Redis is unreachable (or does not answer) nothing is known to be written, so every
    entry of the round trip is sent again, for as long as it takes: the bounded buffer keeps the
    readers going meanwhile. Entries Redis refuses one by one (an error reply) go again with the
    next round trip. One the server refuses as a whole (OOM, READONLY, LOADING...:
    `server_wide`) is given up only once the buffer is full, so an out-of-memory spell loses
    nothing while there is room; one refused for a reason of its own key (WRONGTYPE, NOPERM) is
    given up after `max_refusals` refusals, so that one bad key cannot stall the log. A round
    trip that got nothing in is followed by a wait, one backoff over both kinds of failure; one
    that got some entries in by none."""

    backoff: Backoff
    max_refusals: int

    def unreachable(self) -> float:
        """Seconds to wait before sending the whole round trip again."""
        return self.backoff.next_delay()

    def refused(self, progressed: bool) -> float:
        """Seconds to wait before the next round trip after one in which Redis refused
        entries; `progressed`: it accepted others."""
        if progressed:
            self.backoff.reset()
            return 0.0
        return self.backoff.next_delay()

    def give_up(self, refusals: int, server_wide: bool, buffer_full: bool) -> bool:
        """Whether an entry Redis has now refused `refusals` times is dropped (and reported in
        a gap) instead of sent again."""
        if buffer_full:
            return True
        return not server_wide and refusals >= self.max_refusals

    def written(self) -> None:
        """A round trip with nothing refused: back to no wait."""
        self.backoff.reset()
