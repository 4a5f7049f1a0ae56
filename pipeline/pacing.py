"""How often a process may open a new websocket connection: a token bucket. Pure; the caller
sleeps.

Binance counts connection attempts per IP: 300 in any 5 minutes, websocket streams and the
websocket API together, and bans an IP that keeps going. Every attempt of a process, first
connects, reconnects and rotations alike, takes a token from one bucket (`CONNECT_BURST`
tokens, refilled at `CONNECT_RATE` a second), so a process makes at most
10 + 0.2 × 300 = 70 attempts in any 5 minutes, whatever its connections do: four ingestor
processes behind one IP stay under the 300. The burst lets an ingestor open all its
connections at start (the whole market needs about 8) without waiting.

The bucket hands out reservations: a caller that finds it empty is told how long to wait, and
the next caller waits one refill longer, so attempts queued at once go out one every 5 s.
"""

from __future__ import annotations

from collections.abc import Callable

CONNECT_BURST = 10
CONNECT_RATE = 0.2  # attempts a second once the burst is spent: one every 5 s


class TokenBucket:
    def __init__(self, capacity: float, rate: float, clock: Callable[[], float]) -> None:
        if capacity < 1 or rate <= 0:
            raise ValueError("a bucket needs a capacity of at least 1 and a positive rate")
        self.capacity = capacity
        self.rate = rate
        self.clock = clock
        self._tokens: float | None = None  # full at the first call
        self._at = 0.0

    def take(self) -> float:
        """Reserve one attempt: the seconds to wait before making it (0.0: now)."""
        now = self.clock()
        if self._tokens is None:
            self._tokens = float(self.capacity)
        else:
            self._tokens = min(float(self.capacity),
                               self._tokens + max(0.0, now - self._at) * self.rate)
        self._at = now
        self._tokens -= 1
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


def connect_pacer(clock: Callable[[], float]) -> TokenBucket:
    """The bucket for one process's connection attempts, with Binance's numbers above."""
    return TokenBucket(CONNECT_BURST, CONNECT_RATE, clock)
