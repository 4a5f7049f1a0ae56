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
    """The waits of the log writer's retries of one batch. Pure: the writer thread sleeps.

    While Redis is unreachable nothing is known to be written, so the batch is sent again for
    as long as it takes (the bounded buffer keeps the readers going meanwhile). Entries Redis
    refuses one by one (an error reply) are sent again alone, and given up once refused
    `max_refusals` times: a key Redis keeps refusing must not stall every other key. One
    backoff runs over both, so a batch that meets both keeps waiting longer."""

    backoff: Backoff
    max_refusals: int
    refusals: int = 0

    def unreachable(self) -> float:
        """Seconds to wait before sending the whole batch again."""
        return self.backoff.next_delay()

    def refused(self) -> float | None:
        """Seconds to wait before sending the refused entries again; None: give them up."""
        self.refusals += 1
        if self.refusals >= self.max_refusals:
            return None
        return self.backoff.next_delay()
