"""The projector's own health, for its `/healthz`: is a projection failing right now?

A task marks itself failing at the first failure of an outage and recovered at its first
success; `/healthz` answers 503 once any task has been failing for `unhealthy_after_s` on end.
One object per process, passed to every loop. The tasks:
- each projection's loop (its name): Redis away, writes refused; a loop that stops clears
  its mark;
- each depth snapshot request (`snapshot {symbol}`): REST or Redis failing;
- each exclusive projection's lease (`lease:{name}`, `projections.shell.lease`): no answer
  from Redis to a renewal or an acquisition. It outlives the loop a lost lease stopped, so a
  projection waiting for its lease because Redis is down counts as failing, and it clears at
  the first answer, so the projection (or a standby) is healthy again once Redis is back.
"""

from __future__ import annotations

import time
from collections.abc import Callable

UNHEALTHY_AFTER_S = 30.0


class ProjectorHealth:
    def __init__(self, unhealthy_after_s: float = UNHEALTHY_AFTER_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.unhealthy_after_s = unhealthy_after_s
        self.clock = clock
        self._failing_since: dict[str, float] = {}

    def failed(self, task: str, since: float | None = None) -> None:
        """`since`: when the failed call was sent (on this clock), when it is known: a call
        that hung until its socket timeout failed from then on."""
        self._failing_since.setdefault(task, self.clock() if since is None else since)

    def recovered(self, task: str) -> None:
        self._failing_since.pop(task, None)

    def failing(self) -> dict[str, float]:
        """Task -> seconds it has been failing."""
        now = self.clock()
        return {task: now - since for task, since in list(self._failing_since.items())}

    def healthy(self) -> bool:
        """False once any task has been failing for `unhealthy_after_s` on end."""
        return all(age < self.unhealthy_after_s for age in self.failing().values())
