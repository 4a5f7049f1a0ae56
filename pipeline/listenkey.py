"""The listenKey lifecycle of the user-data stream.

Binance: `POST /fapi/v1/listenKey` (header X-MBX-APIKEY) creates a key or returns the live one;
it lives 60 minutes; `PUT` extends it, and answers -1125 when the key no longer exists (then a
new one must be created); `DELETE` closes it; the stream itself announces `listenKeyExpired`.
The key is the account's, not the caller's: POST returns the account's currently active key,
so every process with the same API key holds the same one, and a DELETE closes it (code 4001)
for all of them. So nothing here DELETEs a key unless the operator asks (`close`, called at
shutdown only with `--close-listen-key`).

Here: one `ListenKeys` object holds the current key as a `Secret` (shown only masked) and
registers every key it receives with `pipeline.logs.register_secret`, so that even a key that
slipped into a log line is scrubbed. `keep_alive` runs as a task: it extends the key every
`keepalive_every` seconds (default 30 minutes, half the key's life, so one failed PUT still
leaves time for the next) and replaces the key on -1125, calling `on_replaced` so the caller
reconnects with the new key. `renew` POSTs for the account's live key (a new one when none
lives), what a private connection closed by the server needs before it reconnects. POST and
PUT are `essential` calls (`pipeline.weight`): no back-off meant for the heavy calls holds
them up.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from pipeline.config import Secret
from pipeline.errors import ExchangeError
from pipeline.logs import register_secret
from pipeline.rest import BadAnswer
from pipeline.signing import SignedRest

log = logging.getLogger("pipeline.listenkey")

PATH = "/fapi/v1/listenKey"
CODE_NO_SUCH_KEY = -1125
DEFAULT_KEEPALIVE_S = 1800.0
RETRY_AFTER_FAILURE_S = 60.0


class ListenKeys:
    def __init__(self, api: SignedRest, *, keepalive_every: float = DEFAULT_KEEPALIVE_S,
                 retry_after_failure: float = RETRY_AFTER_FAILURE_S) -> None:
        self.api = api
        self.keepalive_every = keepalive_every
        self.retry_after_failure = retry_after_failure
        self.key: Secret | None = None
        self.issued = 0  # keys received so far (a metric of churn, and for tests)
        self.extended = 0  # successful keep-alives
        self.renewed = 0  # POSTs after a close that gave back the key already held
        self._lock = trio.Lock()

    def current(self) -> Secret:
        if self.key is None:
            raise RuntimeError("no listenKey yet: call create() first")
        return self.key

    async def create(self) -> Secret:
        """POST: a new key (or the live one: Binance returns it again while it lives)."""
        async with self._lock:
            body = await self.api.keyed("POST", PATH, essential=True)
            return self._take(body, "created")

    async def renew(self) -> Secret:
        """POST again: the account's live key, which another process may have replaced (or
        closed: then a new one). Returns the key now held."""
        async with self._lock:
            before = self.key
            body = await self.api.keyed("POST", PATH, essential=True)
            value = body.get("listenKey") if isinstance(body, dict) else None
            if before is not None and value == before.value:
                self.renewed += 1
                log.info("listenKey confirmed", extra={"listen_key": before.masked()})
                return before
            return self._take(body, "renewed")

    async def replace(self, stale: Secret | None) -> Secret:
        """A new key unless another task already replaced `stale` (expiry event and -1125 can
        race); returns the current key."""
        async with self._lock:
            if self.key is not None and self.key != stale:
                return self.key
            body = await self.api.keyed("POST", PATH, essential=True)
            return self._take(body, "replaced")

    async def extend(self) -> bool:
        """PUT; True when the key had to be replaced (-1125), False when it was extended."""
        key = self.current()
        try:
            body = await self.api.keyed("PUT", PATH, {"listenKey": key.value}, essential=True)
        except ExchangeError as exc:
            if exc.code != CODE_NO_SUCH_KEY:
                raise
            log.warning("listenKey unknown to the exchange (-1125): creating a new one",
                        extra={"listen_key": key.masked()})
            await self.replace(key)
            return True
        if isinstance(body, dict) and body.get("listenKey") not in (None, key.value):
            # the exchange may hand back a different key on PUT: follow it
            async with self._lock:
                self._take(body, "changed on keep-alive")
            return True
        self.extended += 1
        log.info("listenKey extended", extra={"listen_key": key.masked()})
        return False

    async def close(self) -> None:
        """DELETE the key: every connection on it, this process's or another's, is closed.
        Only at shutdown and only when the operator asked; a failure costs nothing more."""
        if self.key is None:
            return
        key, self.key = self.key, None
        try:
            await self.api.keyed("DELETE", PATH, {"listenKey": key.value})
            log.info("listenKey closed", extra={"listen_key": key.masked()})
        except ExchangeError as exc:
            log.warning("listenKey close failed", extra={"error": str(exc)})

    async def keep_alive(self, on_replaced: Callable[[], Awaitable[None]]) -> None:
        """Extend the key for ever; after a replacement let the caller reconnect."""
        delay = self.keepalive_every
        while True:
            await trio.sleep(delay)
            try:
                replaced = await self.extend()
            except ExchangeError as exc:
                log.warning("listenKey keep-alive failed; retrying", extra={"error": str(exc)})
                delay = min(self.retry_after_failure, self.keepalive_every)
                continue
            delay = self.keepalive_every
            if replaced:
                await on_replaced()

    def _take(self, body: object, what: str) -> Secret:
        value = body.get("listenKey") if isinstance(body, dict) else None
        if not isinstance(value, str) or not value:
            raise BadAnswer(f"POST {PATH}: answer holds no listenKey", status=200)
        register_secret(value)
        self.key = Secret(value)
        self.issued += 1
        log.info(f"listenKey {what}", extra={"listen_key": self.key.masked()})
        return self.key
