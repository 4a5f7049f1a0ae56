"""The project's own few exceptions.

Errors of redis-py, trio-websocket and httpx are translated into these at one boundary each
(`pipeline.redisconn.redis_errors`, the websocket connection, the REST client), so callers
handle three ideas instead of thirty classes.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base class of every error this project raises on purpose."""


class SettingsError(PipelineError):
    """A setting is missing or malformed. The CLI prints `str(err)` as one line and exits 2."""

    def __init__(self, setting: str, problem: str) -> None:
        self.setting = setting
        self.problem = problem
        super().__init__(f"{setting}: {problem}")


class RedisUnavailable(PipelineError):
    """Redis could not be reached or dropped the connection mid-command."""


class RedisRefused(RedisUnavailable):
    """Redis is up but refuses writes for now (out of memory, a replica, loading, an ACL being
    fixed): retried like an unreachable Redis, reported with Redis's own reason."""


class ExchangeError(PipelineError):
    """The exchange (or the simulator) answered with an error or not at all."""

    def __init__(self, message: str, *, status: int | None = None, code: int | None = None):
        self.status = status
        self.code = code
        super().__init__(message)
