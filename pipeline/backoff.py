"""Exponential backoff with jitter, shared by the websocket reconnects and the Redis writer.

Pure. Jitter keeps many connections (or several processes) that failed together from all
coming back in the same instant.
"""

from __future__ import annotations

from collections.abc import Callable


def backoff_delay(attempt: int, base: float, cap: float, rand: Callable[[], float]) -> float:
    """Seconds to wait before retry number `attempt` (1, 2, ...): a random value in
    [c/2, c] where c = base * 2**(attempt-1), capped at `cap`."""
    ceiling = min(cap, base * 2 ** max(0, min(attempt - 1, 30)))
    return ceiling * (0.5 + 0.5 * rand())
