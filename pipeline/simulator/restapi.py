"""The simulator's REST side: Binance's market endpoints with their weights, the accounts'
endpoints (handed to `Accounts.handle_rest`, which routes by API key), and the control API under
`/sim/`.

Every answer carries `X-MBX-USED-WEIGHT-1M`. Market calls are weighed before they run and
refused with 429 (code -1003, Retry-After) when they would pass 2400 in the clock minute; an
account call is refused when the minute is already spent, and its weight (known only from its
reply) is counted after. The budget is the IP's: `/sim/account/spend_weight` adds what other
clients on it (COIN-M's, since 2026-06-30) used. The `/sim/` control API is not weighed.

A REST fault switched on (`http.RestFault`, `/sim/account/rest_fault`) is applied first, to any
path outside `/sim/`: it answers instead of the call, delays it, or spoils its body.

Market endpoints: time (1), exchangeInfo (1), premiumIndex (1, 10 without a symbol),
ticker/price (1), depth (2-20 by limit), klines (1-10 by limit; symbol, interval, startTime,
endTime, limit 500 by default and at most 1500; the candles the kline stream shows, see
`candles.py`) and tradingSchedule (5; see `tradfi.py`). A symbol is known from its listing,
trading or not (a delisted one is SETTLING and still answers).

Market controls (`POST /sim/market/<name>`): `list` {"symbol", "contract_type"?},
`delist` {"symbol"}, `session` {"market" or "symbol", "type": a session type or null to
clear}, `crash` {"on": true/false/null, "multiplier"?} (cadence mode).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
import trio

from pipeline.simulator.candles import INTERVALS, MAX_ROWS, klines_weight
from pipeline.simulator.http import HttpRequest, HttpResponse
from pipeline.simulator.market import DEPTH_LIMITS, LEGACY, MARKET, PUBLIC, depth_weight

if TYPE_CHECKING:
    from pipeline.simulator.server import Simulator


class RestApi:
    """The HTTP handler of one simulator (`serve_http(RestApi(sim), host, port)`)."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    async def __call__(self, req: HttpRequest) -> HttpResponse:
        fault = None if req.path.startswith("/sim/") else self.sim.rest_faults.take(req.path)
        if fault is not None:
            if fault.kind == "hang":
                await trio.sleep(fault.seconds)
            instead = fault.reply(self.sim.weight.current(self.sim.clock()))
            if instead is not None:
                return instead
        response = await self._answer(req)
        return response if fault is None else fault.spoil(response)

    async def _answer(self, req: HttpRequest) -> HttpResponse:
        now = self.sim.clock()
        if req.path.startswith("/sim/") and not req.path.startswith("/sim/account"):
            status, body = self._control(req)
            return self._reply(status, body, now)
        meter = self.sim.weight
        market = self._market_rest(req, now)
        if market is not None:
            status, body, weight = market
            if not meter.try_spend(weight, now):
                return self._too_many(now)
            return self._reply(status, body, now)
        accounts = self.sim.accounts
        if accounts is None:
            return self._reply(404, {"code": -1000, "msg": "Path not found."}, now)
        if meter.current(now) >= meter.limit and not req.path.startswith("/sim/"):
            return self._too_many(now)
        reply = await accounts.handle_rest(req.method, req.path, req.query, req.headers,
                                           req.body)
        if reply is None:
            return self._reply(404, {"code": -1000, "msg": "Path not found."}, now)
        if not meter.try_spend(int(reply.weight), now):
            # the account call already happened: count it even past the limit
            meter.force(int(reply.weight), now)
        return self._reply(int(reply.status), reply.body, now)

    def _reply(self, status: int, body: object, now: float) -> HttpResponse:
        data = body if isinstance(body, bytes) else (
            body.encode() if isinstance(body, str) else orjson.dumps(body))
        return HttpResponse(status, data, (
            ("X-MBX-USED-WEIGHT-1M", str(self.sim.weight.current(now))),))

    def _too_many(self, now: float) -> HttpResponse:
        body = orjson.dumps({"code": -1003, "msg": "Too many requests; current limit of IP is "
                             "2400 requests per minute. Please use WebSocket Streams for live "
                             "updates to avoid polling the API."})
        return HttpResponse(429, body, (
            ("X-MBX-USED-WEIGHT-1M", str(self.sim.weight.current(now))),
            ("Retry-After", str(self.sim.weight.retry_after(now)))))

    def _market_rest(self, req: HttpRequest, now: float) -> tuple[int, object, int] | None:
        if req.method != "GET":
            return None
        now_ms = int(now * 1000)
        if req.path.startswith("/fapi/"):
            self.sim.advance_market()  # cadence mode: answer with the market as of now
        symbols = self.sim.market.listings
        if req.path == "/fapi/v1/time":
            return 200, {"serverTime": now_ms}, 1
        if req.path == "/fapi/v1/exchangeInfo":
            return 200, self.sim.market.exchange_info(now_ms), 1
        if req.path == "/fapi/v1/premiumIndex":
            symbol = req.query.get("symbol")
            if not symbol:
                return 200, [self.sim.market.premium_index(s, now_ms) for s in symbols], 10
            if symbol not in symbols:
                return 400, {"code": -1121, "msg": "Invalid symbol."}, 1
            return 200, self.sim.market.premium_index(symbol, now_ms), 1
        if req.path == "/fapi/v1/ticker/price":
            symbol = req.query.get("symbol", "")
            if symbol not in symbols:
                return 400, {"code": -1121, "msg": "Invalid symbol."}, 1
            return 200, self.sim.market.ticker_price(symbol, now_ms), 1
        if req.path == "/fapi/v1/depth":
            return self._depth(req.query, now_ms)
        if req.path == "/fapi/v1/klines":
            return self._klines(req.query, now_ms)
        if req.path == "/fapi/v1/tradingSchedule":
            return 200, self.sim.market.hours.schedule(now_ms), 5
        return None

    def _depth(self, query: dict[str, str], now_ms: int) -> tuple[int, object, int]:
        symbol = query.get("symbol", "")
        if not symbol:
            return 400, {"code": -1102, "msg": "Mandatory parameter 'symbol' was not sent, was "
                                               "empty/null, or malformed."}, 2
        if not self.sim.market.is_listed(symbol):
            return 400, {"code": -1121, "msg": "Invalid symbol."}, 2
        try:
            limit = int(query.get("limit", "500"))
        except ValueError:
            limit = -1
        if limit not in DEPTH_LIMITS:
            return 400, {"code": -1130, "msg": "Data sent for parameter 'limit' is not valid."}, 2
        return 200, self.sim.market.depth_snapshot(symbol, limit, now_ms), depth_weight(limit)

    def _klines(self, query: dict[str, str], now_ms: int) -> tuple[int, object, int]:
        """`GET /fapi/v1/klines`, checked in Binance's order: parameters, then the symbol."""
        try:
            limit = int(query.get("limit", "500"))
            start = int(query["startTime"]) if "startTime" in query else None
            end = int(query["endTime"]) if "endTime" in query else None
        except ValueError:
            return 400, {"code": -1100, "msg": "Illegal characters found in a parameter."}, 1
        weight = klines_weight(limit)
        for name in ("symbol", "interval"):
            if not query.get(name):
                return 400, {"code": -1102, "msg": f"Mandatory parameter '{name}' was not "
                                                   f"sent, was empty/null, or malformed."}, weight
        if query["interval"] not in INTERVALS:
            return 400, {"code": -1120, "msg": "Invalid interval."}, weight
        if not 1 <= limit <= MAX_ROWS:
            return 400, {"code": -1130, "msg": "Data sent for parameter 'limit' is not "
                                               "valid."}, weight
        if start is not None and end is not None and start > end:
            return 400, {"code": -1023, "msg": "Start time is greater than end time."}, weight
        symbol = query["symbol"]
        if not self.sim.market.is_listed(symbol):
            return 400, {"code": -1121, "msg": "Invalid symbol."}, weight
        body = self.sim.market.klines(symbol, query["interval"], start, end, limit, now_ms)
        return 200, body, weight

    def _control(self, req: HttpRequest) -> tuple[int, object]:
        try:
            body = orjson.loads(req.body) if req.body else {}
        except orjson.JSONDecodeError:
            return 400, {"error": "body is not JSON"}
        if not isinstance(body, dict):
            return 400, {"error": "body must be a JSON object"}
        name = req.path[len("/sim/"):]
        if req.method == "GET" and name == "stats":
            return 200, self.sim.stats()
        if req.method != "POST":
            return 405, {"error": "use POST"}
        try:
            return 200, self._control_action(name, body)
        except KeyError:
            return 404, {"error": f"unknown control {name!r}"}
        except (TypeError, ValueError) as exc:
            return 400, {"error": str(exc)}

    def _control_action(self, name: str, body: dict[str, Any]) -> dict[str, object]:
        if name == "silence":
            self.sim.set_silence(bool(body.get("on", True)))
            return {"silent": self.sim.silent}
        if name == "drop":
            path = body.get("path")
            if path not in (None, PUBLIC, MARKET, LEGACY, "private"):
                raise ValueError(f"path must be public, market, legacy, private or null, not "
                                 f"{path!r}")
            return {"dropped": self.sim.drop(path)}
        if name == "malformed":
            return {"connections": self.sim.send_malformed(int(body.get("count", 5)))}
        if name == "sequence_break":
            symbol = str(body["symbol"]).upper()
            if not self.sim.market.is_listed(symbol):
                raise ValueError(f"unknown symbol {symbol!r}")
            self.sim.sequence_break(symbol)
            return {"symbol": symbol}
        if name == "rate":
            rate = body.get("rate", self.sim.rate)
            self.sim.set_rate(None if rate is None else float(rate), body.get("burst"),
                          body.get("burst_every"))
            sim = self.sim
            return {"rate": sim.rate, "burst": sim.burst, "burst_every": sim.burst_every}
        if name.startswith("market/"):
            return self._market_control(name[len("market/"):], body)
        raise KeyError(name)

    def _market_control(self, name: str, body: dict[str, Any]) -> dict[str, object]:
        sim = self.sim
        if name == "list":
            contract = body.get("contract_type")
            return sim.list_symbol(_required(body, "symbol"), None if contract is None else
                                   str(contract))
        if name == "delist":
            return sim.delist(_required(body, "symbol"))
        if name == "session":
            target = body.get("symbol") or body.get("market")
            if not target:
                raise ValueError("name a TradFi symbol or a market (EQUITY, COMMODITY, "
                                 "KR_EQUITY)")
            kind = body.get("type")
            return sim.set_session(str(target), None if kind is None else str(kind))
        if name == "crash":
            on = body.get("on", True)
            multiplier = body.get("multiplier")
            return sim.set_crash(None if on is None else bool(on),
                                 None if multiplier is None else float(multiplier))
        raise KeyError(f"market/{name}")


def _required(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not value:
        raise ValueError(f"{name} is required")
    return str(value)
