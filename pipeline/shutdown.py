"""Run one long-lived service until SIGINT or SIGTERM, then ask it to stop (not a cancel): an
ingestor closes its connections (and listenKey) and writes what it buffered before returning."""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

log = logging.getLogger("pipeline.shutdown")


class Stoppable(Protocol):
    def stop(self) -> None: ...


async def serve_until_signal(start: Callable[..., Awaitable[Any]],
                             running: list[Any]) -> None:
    """`start(task_status=...)` reports the running service (a `Stoppable`), which is also
    appended to `running` for the caller's health check."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            service: Stoppable = await nursery.start(start)
            running.append(service)
            async for signum in signals:
                log.info("shutting down", extra={"signal": signal.Signals(signum).name})
                service.stop()
                break
