"""The simulated exchange's account side: listenKeys, signed REST, the private stream, controls.

The books themselves (orders, algo orders, positions, balances) are the pure `Ledger`; this module
is its thin trio shell, transport-agnostic: the server (`server.py`, sim-market's) hands it each
REST request as (method, path, query, headers, body) and each `/private/ws` connection. Every
change made through the control API (`/sim/account/...`) returns the events Binance would push;
they go, serialised once, to the private-stream connections open at that moment on the live
listenKey, filtered by each connection's `events=`. Nothing is queued for a connection that is not
open: as on Binance, a client that was away learns what happened by reconciling over REST.

Secrets: the listenKey is only ever returned by POST /fapi/v1/listenKey (and, as Binance does, in
the `listenKeyExpired` event). Errors and close reasons never echo it.
"""

from __future__ import annotations

import logging
import random
import secrets
import string
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

import attrs
import orjson
import trio
from trio_websocket import ConnectionClosed

from pipeline.simulator import wire
from pipeline.simulator.auth import AuthError, Verifier, check_api_key, check_timestamp
from pipeline.simulator.config import SimConfig
from pipeline.simulator.ledger import AlgoOrder, Event, Ledger, LedgerError, PlaceRequest, dec

log = logging.getLogger(__name__)

LISTEN_KEY_PATH = "/fapi/v1/listenKey"
CONTROL_PREFIX = "/sim/account/"
SUBSCRIBER_BUFFER = 10_000  # a consumer this far behind is dropped, as Binance drops slow ones
_ALNUM = string.ascii_letters + string.digits


@attrs.frozen
class RestReply:
    """An answer for the HTTP layer: status, JSON-able body, and the request weight it costs."""

    status: int
    body: object
    weight: int


@attrs.define(eq=False)
class _Subscriber:
    listen_key: str
    events: frozenset[str] | None
    send: trio.MemorySendChannel[str]


def _error(status: int, code: int, msg: str, weight: int) -> RestReply:
    return RestReply(status, {"code": code, "msg": msg}, weight)


def _weight_by_symbol(query: Mapping[str, str]) -> int:
    return 1 if query.get("symbol") else 40


class Account:
    """One simulated USDⓈ-M futures account. `clock` is the exchange's clock (seconds)."""

    def __init__(self, config: SimConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._clock = clock
        self.ledger = Ledger(tuple(config.symbols), hedge_mode=bool(config.hedge_mode))
        self._verifier = Verifier.from_config(config.api_secret, config.ed25519_public_key_pem)
        self._listen_key: str | None = None
        self._key_expires = 0.0
        self._subscribers: set[_Subscriber] = set()
        self._changed = trio.Event()
        self._rng = random.Random(config.seed)
        # Every key ever issued, so that tests can scan logs and Redis for all of them.
        self.issued_listen_keys: list[str] = []
        self._signed: dict[str, tuple[Callable[[Mapping[str, str]], object],
                                      Callable[[Mapping[str, str]], int]]] = {
            "/fapi/v1/openOrders": (self._open_orders, _weight_by_symbol),
            "/fapi/v1/openAlgoOrders": (self._open_algo_orders, _weight_by_symbol),
            "/fapi/v3/positionRisk": (self._position_risk, lambda q: 5),
            "/fapi/v1/order": (self._get_order, lambda q: 1),
            "/fapi/v1/algoOrder": (self._get_algo_order, lambda q: 1),
            "/fapi/v2/balance": (self._balance, lambda q: 5),
        }
        self._controls: dict[str, Callable[[dict[str, Any]], object]] = {
            "place": self._ctl_place, "fill": self._ctl_fill, "cancel": self._ctl_cancel,
            "expire": self._ctl_expire, "amend": self._ctl_amend, "trigger": self._ctl_trigger,
            "expire_listen_key": self._ctl_expire_listen_key,
            "hedge_mode": self._ctl_hedge_mode, "unknown_event": self._ctl_unknown_event,
            "funding": self._ctl_funding, "mark": self._ctl_mark, "state": self._ctl_state,
        }

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    def set_mark_source(self, source: Callable[[str], str | Decimal | None]) -> None:
        """Let MARKET fills, positionRisk and the demo script use the market side's price
        (e.g. the simulated book's mid) instead of the account's own last trade price."""

        def mark(symbol: str) -> Decimal | None:
            value = source(symbol)
            return Decimal(str(value)) if value not in (None, "") else None

        self.ledger.mark_source = mark

    # ---- REST entry point ------------------------------------------------------------------
    async def handle_rest(self, method: str, path: str, query: dict[str, str],
                          headers: dict[str, str], body: bytes) -> RestReply | None:
        """Answer a request on one of the account's paths; None when the path is not ours."""
        if path == LISTEN_KEY_PATH:
            return self._listen_key_request(method.upper(), query, headers)
        if path in self._signed:
            return self._signed_request(method.upper(), path, query, headers)
        if path.startswith(CONTROL_PREFIX):
            return self._control(method.upper(), path[len(CONTROL_PREFIX):].strip("/"), body)
        return None

    def _signed_request(self, method: str, path: str, query: Mapping[str, str],
                        headers: Mapping[str, str]) -> RestReply:
        handler, weight_of = self._signed[path]
        weight = weight_of(query)
        if method != "GET":
            return _error(405, -1000, f"The simulator serves only GET {path}.", weight)
        try:
            check_api_key(headers, self.config.api_key)
            self._verifier.check_signature(query)
            check_timestamp(query, self.now_ms())
            return RestReply(200, handler(query), weight)
        except AuthError as err:
            return _error(err.status, err.code, err.msg, weight)
        except LedgerError as err:
            return _error(400, err.code, err.msg, weight)

    # ---- listenKey ---------------------------------------------------------------------------
    def _listen_key_request(self, method: str, query: Mapping[str, str],
                            headers: Mapping[str, str]) -> RestReply:
        try:
            check_api_key(headers, self.config.api_key)
        except AuthError as err:
            return _error(err.status, err.code, err.msg, 1)
        if method == "POST":
            return RestReply(200, {"listenKey": self._create_or_extend()}, 1)
        if method == "PUT":
            sent = query.get("listenKey")
            if not self._key_live() or (sent and sent != self._listen_key):
                return _error(400, -1125, "This listenKey does not exist.", 1)
            self._key_expires = self._clock() + self.config.listen_key_ttl
            self._notify()
            return RestReply(200, {"listenKey": self._listen_key}, 1)
        if method == "DELETE":
            self._close_key()
            return RestReply(200, {}, 1)
        return _error(405, -1000, "Unsupported method on /fapi/v1/listenKey.", 1)

    def _key_live(self) -> bool:
        return self._listen_key is not None and self._clock() < self._key_expires

    def _create_or_extend(self) -> str:
        """Binance: a POST while a key is live returns that key and extends it."""
        if not self._key_live() or self._listen_key is None:
            self._listen_key = "".join(secrets.choice(_ALNUM) for _ in range(64))
            self.issued_listen_keys.append(self._listen_key)
        self._key_expires = self._clock() + self.config.listen_key_ttl
        self._notify()
        return self._listen_key

    def _close_key(self) -> None:
        """DELETE: the key is gone and its streams are closed."""
        for sub in [s for s in self._subscribers if s.listen_key == self._listen_key]:
            sub.send.close()
        self._listen_key = None
        self._notify()

    def expire_listen_key(self) -> bool:
        """Announce `listenKeyExpired` on the key's streams and invalidate it (False: none live)."""
        key = self._listen_key
        if key is None:
            return False
        self._push([wire.listen_key_expired(key, self.now_ms())])
        self._listen_key = None
        self._notify()
        log.info("listenKey expired (announced on %d stream(s))", self.connection_count())
        return True

    # ---- private stream ----------------------------------------------------------------------
    def connection_count(self) -> int:
        return len(self._subscribers)

    async def wait_for_connections(self, count: int) -> None:
        """Return once exactly `count` private-stream connections are attached (for tests)."""
        while self.connection_count() != count:
            await self._changed.wait()

    async def serve_user_ws(self, ws: Any, query: dict[str, str]) -> None:
        """Serve one `/private/ws?listenKey=K&events=E1/E2` connection until it ends."""
        if hasattr(ws, "accept"):  # handed the handshake request, not yet the connection
            ws = await ws.accept()
        key = query.get("listenKey", "")
        if not key or key != self._listen_key or not self._key_live():
            # Never echo the key: the reason names the problem only.
            await ws.aclose(code=4001, reason="listenKey does not exist or has expired")
            return
        wanted = frozenset(e for e in query.get("events", "").split("/") if e) or None
        send, receive = trio.open_memory_channel[str](SUBSCRIBER_BUFFER)
        sub = _Subscriber(key, wanted, send)
        self._subscribers.add(sub)
        self._notify()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_until_closed, ws, nursery.cancel_scope)
                nursery.start_soon(self._expire_when_due, key)
                await self._forward(ws, receive)
                nursery.cancel_scope.cancel()
            with trio.move_on_after(1):
                await ws.aclose(code=1000, reason="stream closed")
        finally:
            self._subscribers.discard(sub)
            self._notify()

    async def _forward(self, ws: Any, receive: trio.MemoryReceiveChannel[str]) -> None:
        try:
            async for text in receive:
                await ws.send_message(text)
        except ConnectionClosed:
            pass

    @staticmethod
    async def _read_until_closed(ws: Any, scope: trio.CancelScope) -> None:
        """Client messages are ignored; reading notices the client going away."""
        try:
            while True:
                await ws.get_message()
        except ConnectionClosed:
            scope.cancel()

    async def _expire_when_due(self, key: str) -> None:
        """The key's TTL ran out without a PUT: Binance announces listenKeyExpired."""
        while self._listen_key == key:
            remaining = self._key_expires - self._clock()
            if remaining <= 0:
                self.expire_listen_key()
                return
            with trio.move_on_after(remaining):
                await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _push(self, events: list[Event]) -> None:
        """Fan events out to the connections open now on the live key; no queue for others."""
        for event in events:
            text = orjson.dumps(event).decode()
            for sub in list(self._subscribers):
                if sub.listen_key != self._listen_key:
                    continue
                if sub.events is not None and event.get("e") not in sub.events:
                    continue
                try:
                    sub.send.send_nowait(text)
                except trio.WouldBlock:
                    log.warning("private stream consumer too slow; closing it")
                    sub.send.close()
                except trio.ClosedResourceError:
                    pass

    # ---- signed REST views -------------------------------------------------------------------
    def _symbol_filter(self, query: Mapping[str, str]) -> str | None:
        symbol = query.get("symbol") or None
        if symbol is not None and symbol.upper() not in self.ledger.symbols:
            raise LedgerError(-1121, "Invalid symbol.")
        return symbol.upper() if symbol else None

    def _open_orders(self, query: Mapping[str, str]) -> object:
        orders = self.ledger.open_orders(self._symbol_filter(query))
        return [wire.rest_order(o) for o in sorted(orders, key=lambda o: o.order_id)]

    def _open_algo_orders(self, query: Mapping[str, str]) -> object:
        algos = self.ledger.open_algos(self._symbol_filter(query))
        return [wire.rest_algo_order(a, self.ledger.linked_order(a))
                for a in sorted(algos, key=lambda a: a.algo_id)]

    def _position_risk(self, query: Mapping[str, str]) -> object:
        only = self._symbol_filter(query)
        wallet = self.ledger.balances["USDT"]
        return [wire.position_risk(self.ledger.position(s, side), self.ledger.mark(s), wallet,
                                   self.ledger.open_notional(s))
                for s in self.ledger.risk_symbols() if only in (None, s)
                for side in self.ledger.position_sides()]

    def _get_order(self, query: Mapping[str, str]) -> object:
        order_id, client_id = query.get("orderId"), query.get("origClientOrderId")
        if not order_id and not client_id:
            raise LedgerError(-1102, "Param 'origClientOrderId' or 'orderId' must be sent, but "
                                     "both were empty/null!")
        order = self.ledger.find_order(order_id, client_id)
        if query.get("symbol") and query["symbol"].upper() != order.symbol:
            raise LedgerError(-2013, "Order does not exist.")
        return wire.rest_order(order)

    def _get_algo_order(self, query: Mapping[str, str]) -> object:
        algo_id, client_id = query.get("algoId"), query.get("clientAlgoId")
        if not algo_id and not client_id:
            raise LedgerError(-1102, "Param 'clientAlgoId' or 'algoId' must be sent, but both "
                                     "were empty/null!")
        algo = self.ledger.find_algo(algo_id, client_id)
        return wire.rest_algo_order(algo, self.ledger.linked_order(algo))

    def _balance(self, query: Mapping[str, str]) -> object:
        upnl, now = self.ledger.unrealized_total(), self.now_ms()
        return [wire.balance_row(asset, wallet, upnl, now)
                for asset, wallet in self.ledger.balances.items()]

    def state(self) -> dict[str, object]:
        """What the REST endpoints would return now, plus the simulator's own facts."""
        return {
            "openOrders": self._open_orders({}), "openAlgoOrders": self._open_algo_orders({}),
            "positions": self._position_risk({}), "balances": self._balance({}),
            "hedgeMode": self.ledger.hedge_mode, "userStreams": self.connection_count(),
            "listenKeyLive": self._key_live(),
        }

    # ---- control API -------------------------------------------------------------------------
    def control(self, name: str, body: dict[str, Any]) -> object:
        """Apply one control action in-process (same as POST /sim/account/<name>)."""
        if name not in self._controls:
            raise LedgerError(-1000, f"Unknown control {name!r}.")
        return self._controls[name](body)

    def _control(self, method: str, name: str, raw: bytes) -> RestReply:
        if name == "state":
            return RestReply(200, self.state(), 0)
        if method != "POST":
            return _error(405, -1000, "Control actions are POSTed with a JSON body.", 0)
        try:
            body = orjson.loads(raw) if raw.strip() else {}
            if not isinstance(body, dict):
                raise LedgerError(-1102, "The body must be a JSON object.")
            return RestReply(200, self.control(name, body), 0)
        except orjson.JSONDecodeError:
            return _error(400, -1102, "The body is not JSON.", 0)
        except LedgerError as err:
            return _error(404 if err.code == -1000 else 400, err.code, err.msg, 0)

    def _apply(self, result: tuple[list[Event], Any]) -> Any:
        events, changed = result
        self._push(events)
        return changed

    def _order_json(self, order_id: int) -> object:
        return wire.rest_order(self.ledger.orders[order_id])

    def _ctl_place(self, body: dict[str, Any]) -> object:
        placed = self._apply(self.ledger.place(PlaceRequest.from_json(body), self.now_ms()))
        if isinstance(placed, AlgoOrder):
            return wire.rest_algo_order(placed)
        return self._order_json(placed.order_id)

    def _ctl_fill(self, body: dict[str, Any]) -> object:
        qty = dec(body["quantity"], "quantity") if body.get("quantity") else None
        price = dec(body["price"], "price") if body.get("price") else None
        order = self._apply(self.ledger.fill(_id(body, "orderId"), qty, price, self.now_ms()))
        return self._order_json(order.order_id)

    def _end(self, body: dict[str, Any], status: str) -> object:
        if body.get("algoId") is not None:
            algo = self._apply(self.ledger.end_algo(_id(body, "algoId"), status, self.now_ms()))
            return wire.rest_algo_order(algo)
        order = self._apply(self.ledger.end_order(_id(body, "orderId"), status, self.now_ms()))
        return self._order_json(order.order_id)

    def _ctl_cancel(self, body: dict[str, Any]) -> object:
        return self._end(body, "CANCELED")

    def _ctl_expire(self, body: dict[str, Any]) -> object:
        return self._end(body, "EXPIRED")

    def _ctl_amend(self, body: dict[str, Any]) -> object:
        qty = dec(body["quantity"], "quantity") if body.get("quantity") else None
        price = dec(body["price"], "price") if body.get("price") else None
        order = self._apply(self.ledger.amend(_id(body, "orderId"), price, qty, self.now_ms()))
        return self._order_json(order.order_id)

    def _ctl_trigger(self, body: dict[str, Any]) -> object:
        price = dec(body["price"], "price") if body.get("price") else None
        algo = self._apply(self.ledger.trigger(_id(body, "algoId"), price, self.now_ms()))
        return wire.rest_algo_order(algo, self.ledger.linked_order(algo))

    def _ctl_expire_listen_key(self, body: dict[str, Any]) -> object:
        return {"expired": self.expire_listen_key()}

    def _ctl_hedge_mode(self, body: dict[str, Any]) -> object:
        self.ledger.set_hedge_mode(bool(body.get("on", True)))
        return {"hedgeMode": self.ledger.hedge_mode}

    def _ctl_unknown_event(self, body: dict[str, Any]) -> object:
        now = self.now_ms()
        event = {"e": str(body.get("e") or "SIM_UNKNOWN_EVENT"), "E": now, "T": now,
                 "zz": {"note": "an event type no client knows", "n": self._rng.randint(1, 99)}}
        self._push([event])
        return event

    def _ctl_funding(self, body: dict[str, Any]) -> object:
        try:
            amount = Decimal(str(body.get("amount", "-0.5")))
        except InvalidOperation:
            raise LedgerError(-1102, "Parameter 'amount' was malformed.") from None
        events = self.ledger.funding(str(body.get("symbol", "")), amount, self.now_ms())
        self._push(events)
        return events[0]

    def _ctl_mark(self, body: dict[str, Any]) -> object:
        symbol = str(body.get("symbol", "")).upper()
        if symbol not in self.ledger.symbols:
            raise LedgerError(-1121, "Invalid symbol.")
        self.ledger.pinned[symbol] = dec(body.get("price"), "price")
        return {"symbol": symbol, "markPrice": wire.fmt(self.ledger.mark(symbol))}

    def _ctl_state(self, body: dict[str, Any]) -> object:
        return self.state()

    # ---- scripted activity (demo) ------------------------------------------------------------
    def script(self) -> Iterator[float]:
        """Random but seeded account activity; each step acts, then yields seconds to wait.

        Trio-free so that any driver can run it; `run_script` is the trio one.
        """
        rng = self._rng
        while True:
            symbol = rng.choice(self.ledger.symbols)
            mark = self.ledger.mark(symbol)
            side = rng.choice(("BUY", "SELL"))
            qty = Decimal(rng.choice(("0.01", "0.02", "0.05")))
            offset = Decimal(1) - Decimal("0.001") if side == "BUY" else Decimal("1.001")
            yield from self._script_round(symbol, side, qty, (mark * offset).quantize(
                Decimal("0.01")), rng)

    def _script_round(self, symbol: str, side: str, qty: Decimal, price: Decimal,
                      rng: random.Random) -> Iterator[float]:
        ps = {"BUY": "LONG", "SELL": "SHORT"}[side] if self.ledger.hedge_mode else "BOTH"
        base = {"symbol": symbol, "side": side, "quantity": str(qty), "positionSide": ps}
        order = self._ctl_place({**base, "type": "LIMIT", "price": str(price)})
        yield rng.uniform(1.0, 3.0)
        order_id = _as_dict(order)["orderId"]
        self._ctl_fill({"orderId": order_id, "quantity": str(qty / 2)})
        yield rng.uniform(1.0, 3.0)
        self._ctl_fill({"orderId": order_id})
        close = {"BUY": "SELL", "SELL": "BUY"}[side]
        # A stop-loss or a take-profit closes the round, 1 % away on the losing or winning side.
        kind = rng.choice(("STOP_MARKET", "TAKE_PROFIT_MARKET"))
        loses = (kind == "STOP_MARKET") == (side == "BUY")
        stop = price * (Decimal("0.99") if loses else Decimal("1.01"))
        algo = self._ctl_place({**base, "side": close, "type": kind,
                                "triggerPrice": str(stop.quantize(Decimal("0.01"))),
                                "reduceOnly": ps == "BOTH"})
        spare = self._ctl_place({**base, "type": "LIMIT", "price": str(price * Decimal("0.9"))
                                 if side == "BUY" else str(price * Decimal("1.1"))})
        yield rng.uniform(1.0, 3.0)
        self._ctl_cancel({"orderId": _as_dict(spare)["orderId"]})
        yield rng.uniform(1.0, 3.0)
        self._ctl_trigger({"algoId": _as_dict(algo)["algoId"]})
        yield rng.uniform(2.0, 4.0)

    async def run_script(self, sleep: Callable[[float], Awaitable[None]] = trio.sleep) -> None:
        """Drive `script()` until cancelled (the demo's `--script-account`)."""
        for delay in self.script():
            await sleep(delay)


def _id(body: Mapping[str, Any], name: str) -> int:
    try:
        return int(body[name])
    except (KeyError, TypeError, ValueError):
        raise LedgerError(-1102, f"Mandatory parameter '{name}' was not sent, was empty/null, "
                                 "or malformed.") from None


def _as_dict(value: object) -> dict[str, Any]:
    assert isinstance(value, dict)
    return value
