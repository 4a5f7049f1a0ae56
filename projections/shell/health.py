"""The projector's own health, for its `/healthz`: is a projection failing right now?

A task (a projection's loop, a snapshot request) marks itself failing at the first failure of
an outage and recovered at its first success; `/healthz` answers 503 once any task has been
failing for `unhealthy_after_s` on end. One object per process, passed to every loop.
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
