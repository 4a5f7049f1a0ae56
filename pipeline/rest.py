"""Async REST client for the exchange (public endpoints here; signing in `pipeline.signing`).

One seam: the httpx transport is a constructor argument (tests may pass their own; in this
project they talk to the real simulator over HTTP). httpx errors become ExchangeError here and
nowhere else. Weight is checked before each call and read back from every answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx
import orjson
import trio

from pipeline.errors import ExchangeError
from pipeline.weight import WEIGHTS, WeightBudget


class RestClient:
    def __init__(
        self,
        base_url: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
        budget: WeightBudget | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.clock = clock
        self.budget = budget or WeightBudget()
        self._http = httpx.AsyncClient(base_url=self.base_url, transport=transport,
                                       timeout=timeout)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        weight: int | None = None,
    ) -> Any:
        """Send one request and return its decoded JSON; waits first if the weight is spent."""
        w = WEIGHTS.get(path, 1) if weight is None else weight
        delay = self.budget.take(w, self.clock())
        if delay > 0:  # spent for this minute: wait, then spend (the minute has rolled)
            await trio.sleep(delay)
            self.budget.spend(w, self.clock())
        try:
            resp = await self._http.request(method, path, params=params, headers=headers)
        except httpx.HTTPError as exc:
            # the message of an httpx error can hold the full URL (and a signature): not kept
            raise ExchangeError(f"{method} {path}: {type(exc).__name__}") from None
        self.budget.observe_response(resp.headers, resp.status_code, self.clock())
        try:
            body = orjson.loads(resp.content) if resp.content else None
        except orjson.JSONDecodeError:
            body = None
        if resp.status_code >= 400:
            code = body.get("code") if isinstance(body, dict) else None
            msg = body.get("msg") if isinstance(body, dict) else resp.reason_phrase
            raise ExchangeError(f"{method} {path}: HTTP {resp.status_code} {code} {msg}",
                                status=resp.status_code, code=code)
        return body

    async def get(self, path: str, params: Mapping[str, Any] | None = None,
                  weight: int | None = None) -> Any:
        return await self.request("GET", path, params=params, weight=weight)

    # --- public endpoints used by the market side ---------------------------------------

    async def trading_symbols(self) -> list[str]:
        info = await self.get("/fapi/v1/exchangeInfo")
        return [s["symbol"] for s in info["symbols"] if s.get("status") == "TRADING"]
