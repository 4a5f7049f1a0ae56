"""Async REST client for the exchange (public endpoints here; signing in `pipeline.signing`).

One seam: the httpx transport is a constructor argument (tests may pass their own; in this
project they talk to the real simulator over HTTP). httpx errors become ExchangeError here and
nowhere else. Weight is checked before each call and read back from every answer.

What an answer can be, and what the caller gets:
- 2xx with the JSON it expects: the decoded body;
- 2xx whose body is empty, cut short, not JSON, or not the shape asked for (`expect=list` or
  `dict`): `BadAnswer`, a one-line ExchangeError (a proxy or the exchange lost the body; the
  caller retries later, and never takes it for an answer);
- 429 / 418: `RateLimited`, after the budget started its back-off (`pipeline.weight`); the
  warning line says for how long and why, and `on_backoff` hears of it (the user ingestor logs
  it to `raw:conn:user`, where `pipeline status` shows it);
- any other 4xx/5xx: ExchangeError with the HTTP status and Binance's code;
- no answer (refused, reset, timed out): ExchangeError with `status` None.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import httpx
import orjson
import trio

from pipeline.errors import ExchangeError
from pipeline.weight import WEIGHTS, WeightBudget, parse_retry_after, utc_text

log = logging.getLogger("pipeline.rest")


class BadAnswer(ExchangeError):
    """A 2xx answer whose body is not the JSON the call returns."""


class RateLimited(ExchangeError):
    """A 429 or 418 answer; the budget now holds calls back until `until` (unix seconds)."""

    def __init__(self, message: str, *, status: int, code: int | None, until: float) -> None:
        super().__init__(message, status=status, code=code)
        self.until = until


@attrs.frozen
class BackoffNotice:
    """What a 429 or 418 made the client do, for logs and `pipeline status`."""

    status: int  # 429 or 418
    method: str
    path: str
    retry_after: str | None  # as the exchange sent it
    wait_s: float  # as applied, within the documented bounds
    until: float  # unix seconds

    @property
    def scope(self) -> str:
        return "every call" if self.status == 418 else "calls that spend weight"

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "method": self.method, "path": self.path,
                "retry_after": self.retry_after, "wait_s": round(self.wait_s, 3),
                "until": round(self.until, 3), "scope": self.scope}


class RestClient:
    def __init__(
        self,
        base_url: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
        budget: WeightBudget | None = None,
        timeout: float = 10.0,
        on_backoff: Callable[[BackoffNotice], None] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.clock = clock
        self.budget = budget or WeightBudget()
        self.on_backoff = on_backoff
        self.calls: Counter[str] = Counter()  # requests sent, by path
        self.weight_spent: Counter[str] = Counter()  # weight they cost by our count, by path
        self._paused_logged = 0.0
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
        essential: bool = False,
        expect: type | None = None,
    ) -> Any:
        """Send one request and return its decoded JSON; waits first if the weight is spent or
        a back-off is running (`essential`: only a ban holds it back)."""
        w = WEIGHTS.get(path, 1) if weight is None else weight
        await self._wait_for_budget(w, essential)
        self.calls[path] += 1
        self.weight_spent[path] += w
        try:
            resp = await self._http.request(method, path, params=params, headers=headers)
        except httpx.HTTPError as exc:
            # the message of an httpx error can hold the full URL (and a signature): not kept
            raise ExchangeError(f"{method} {path}: {type(exc).__name__}") from None
        now = self.clock()
        wait = self.budget.observe_response(resp.headers, resp.status_code, now)
        body = _json_or_none(resp.content)
        if resp.status_code in (418, 429):
            raise self._rate_limited(method, path, resp, body, wait, now)
        if resp.status_code >= 400:
            code, msg = _code_and_msg(body, resp.reason_phrase)
            raise ExchangeError(f"{method} {path}: HTTP {resp.status_code} {code} {msg}",
                                status=resp.status_code, code=code)
        return _checked(method, path, resp, body, expect)

    async def _wait_for_budget(self, weight: int, essential: bool) -> None:
        while True:
            delay = self.budget.take(weight, self.clock(), essential=essential)
            if delay <= 0:
                return
            until = self.clock() + delay
            if delay > 5 and until > self._paused_logged:
                self._paused_logged = until
                log.warning("REST calls paused", extra={"until": utc_text(until),
                                                        "seconds": round(delay, 1)})
            await trio.sleep(delay)

    def _rate_limited(self, method: str, path: str, resp: httpx.Response, body: Any,
                      wait: float, now: float) -> RateLimited:
        code, msg = _code_and_msg(body, resp.reason_phrase)
        told = resp.headers.get("Retry-After")
        notice = BackoffNotice(resp.status_code, method, path, told, wait, now + wait)
        capped = parse_retry_after(told) not in (None, wait)
        log.warning("REST rate limited: IP banned" if resp.status_code == 418 else
                    "REST rate limited: backing off", extra={
                        "status": resp.status_code, "path": f"{method} {path}",
                        "retry_after": told, "wait_s": round(wait, 1), "capped": capped,
                        "until": utc_text(notice.until), "scope": notice.scope})
        if self.on_backoff is not None:
            self.on_backoff(notice)
        return RateLimited(f"{method} {path}: HTTP {resp.status_code} {code} {msg}; "
                           f"{notice.scope} paused until {utc_text(notice.until)}",
                           status=resp.status_code, code=code, until=notice.until)

    async def get(self, path: str, params: Mapping[str, Any] | None = None,
                  weight: int | None = None, expect: type | None = None) -> Any:
        return await self.request("GET", path, params=params, weight=weight, expect=expect)

    # --- public endpoints used by the market side ---------------------------------------

    async def exchange_info(self) -> dict[str, Any]:
        info = await self.get("/fapi/v1/exchangeInfo", expect=dict)
        if not isinstance(info.get("symbols"), list):
            raise BadAnswer("GET /fapi/v1/exchangeInfo: answer lists no symbols", status=200)
        return info

    async def trading_symbols(self) -> list[str]:
        info = await self.exchange_info()
        return [s["symbol"] for s in info["symbols"] if s.get("status") == "TRADING"]


_NOT_JSON = object()


def _json_or_none(content: bytes) -> Any:
    if not content:
        return None
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return _NOT_JSON


def _code_and_msg(body: Any, reason: str) -> tuple[int | None, str]:
    if isinstance(body, dict):
        code = body.get("code")
        return (code if isinstance(code, int) else None), str(body.get("msg", reason))
    return None, reason


def _checked(method: str, path: str, resp: httpx.Response, body: Any,
             expect: type | None) -> Any:
    """The body of a 2xx answer, or BadAnswer when it is not the JSON the call returns."""
    where = f"{method} {path}: HTTP {resp.status_code}"
    if body is None:
        raise BadAnswer(f"{where} with an empty body", status=resp.status_code)
    if body is _NOT_JSON:
        raise BadAnswer(f"{where} with a body that is not JSON ({len(resp.content)} bytes, "
                        "cut short?)", status=resp.status_code)
    if expect is not None and not isinstance(body, expect):
        raise BadAnswer(f"{where}: a JSON {type(body).__name__} where a {expect.__name__} "
                        "was expected", status=resp.status_code)
    return body
