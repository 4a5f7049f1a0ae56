"""The simulated exchange's account side: accounts, listenKeys, signed REST, the private stream,
controls.

The books themselves (orders, algo orders, positions, balances, trades) are the pure `Ledger`;
this module is its thin trio shell, transport-agnostic: the server (`server.py`) hands `Accounts`
each REST request as (method, path, query, headers, body) and each `/private/...` connection.

`Accounts` holds one `Account` per API key (the "main" one from `SimConfig.api_key`, more from
`SimConfig.accounts`) and routes: signed REST and listenKey calls by the `X-MBX-APIKEY` header,
private-stream connections by listenKey (`/private/stream` may name keys of several accounts),
the control API `/sim/account/<action>` by the body's (or query's) `account` name, "main" when
none is given. It also owns what is the exchange's rather than an account's: its clock
(`advance_clock`), the IP's request weight (`spend_weight`, as COIN-M clients on the same IP do
since 2026-06-30) and the REST faults (`rest_fault`, `clear_rest_faults`).

listenKey, as Binance: POST returns the account's live key (a new one only when none is live)
and extends it, so every caller with the same API key shares it; PUT extends it, -1125 for an
unknown or closed key; DELETE closes it for every connection on it (`userstream.py`: code 4001).

Every change made through the control API returns the events Binance would push; they go,
serialised once, to the private-stream connections open at that moment on the live listenKey,
filtered by each connection's `events=`. Nothing is queued for a connection that is not open: as
on Binance, a client that was away learns what happened by reconciling over REST.

Secrets: the listenKey is only ever returned by POST /fapi/v1/listenKey (and, as Binance does, in
the `listenKeyExpired` event and in the `stream` name of `/private/stream` frames). Errors and
close reasons never echo it, nor an API key or secret.
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

from pipeline.simulator import history, userstream, wire
from pipeline.simulator.auth import AuthError, Verifier, check_api_key, check_timestamp, header
from pipeline.simulator.config import MAIN_ACCOUNT, AccountKeys, SimConfig
from pipeline.simulator.http import RestFault, RestFaults, WeightMeter
from pipeline.simulator.ledger import AlgoOrder, Event, Ledger, LedgerError, PlaceRequest, dec

log = logging.getLogger(__name__)

LISTEN_KEY_PATH = "/fapi/v1/listenKey"
CONTROL_PREFIX = "/sim/account/"
SUBSCRIBER_BUFFER = userstream.SUBSCRIBER_BUFFER
STRATEGY_STATUSES = frozenset({"NEW", "WORKING", "CANCELLED", "EXPIRED"})
# Each further account numbers its orders, algo orders and trades in its own range.
ID_STRIDES = (100_000_000, 10_000_000, 10_000_000)
_ALNUM = string.ascii_letters + string.digits

Control = Callable[[dict[str, Any]], object]
Signed = tuple[Callable[[Mapping[str, str]], object], Callable[[Mapping[str, str]], int]]


class ExchangeClock:
    """The exchange's clock (seconds): `base` moved forward by `advance`, never back."""

    def __init__(self, base: Callable[[], float] = time.time) -> None:
        self._base = base
        self.offset = 0.0

    def __call__(self) -> float:
        return self._base() + self.offset

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("the exchange clock only moves forward")
        self.offset += seconds


@attrs.frozen
class RestReply:
    """An answer for the HTTP layer: status, JSON-able body, and the request weight it costs."""

    status: int
    body: object
    weight: int


def _error(status: int, code: int, msg: str, weight: int) -> RestReply:
    return RestReply(status, {"code": code, "msg": msg}, weight)


def _weight_by_symbol(query: Mapping[str, str]) -> int:
    return 1 if query.get("symbol") else 40


def _fixed(weight: int) -> Callable[[Mapping[str, str]], int]:
    return lambda query: weight


def _parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError:
        raise LedgerError(-1102, "The body is not JSON.") from None
    if not isinstance(body, dict):
        raise LedgerError(-1102, "The body must be a JSON object.")
    return body


def _control_reply(run: Callable[[], object]) -> RestReply:
    try:
        return RestReply(200, run(), 0)
    except LedgerError as err:
        return _error(404 if err.code == -1000 else 400, err.code, err.msg, 0)
    except (KeyError, TypeError, ValueError) as exc:
        return _error(400, -1102, f"Bad control body: {exc}", 0)


class Account:
    """One simulated USDⓈ-M futures account. `clock` is the exchange's clock (seconds)."""

    def __init__(self, config: SimConfig, clock: Callable[[], float] = time.time,
                 keys: AccountKeys | None = None, index: int = 0) -> None:
        self.config = config
        self.name = keys.name if keys else MAIN_ACCOUNT
        self.api_key = keys.api_key if keys else config.api_key
        self._clock = clock
        self.ledger = Ledger(tuple(config.symbols), hedge_mode=bool(config.hedge_mode))
        self.ledger.next_order_id += index * ID_STRIDES[0]
        self.ledger.next_algo_id += index * ID_STRIDES[1]
        self.ledger.next_trade_id += index * ID_STRIDES[2]
        self._verifier = (Verifier(keys.api_secret) if keys else
                          Verifier.from_config(config.api_secret, config.ed25519_public_key_pem))
        self._listen_key: str | None = None
        self._key_expires = 0.0
        self._subscribers: set[userstream.Subscriber] = set()
        self._changed = trio.Event()
        self._rng = random.Random(config.seed + index)
        self._next_strategy_id = 176_054_594 + index * 1_000_000
        # Every key ever issued, so that tests can scan logs and Redis for all of them.
        self.issued_listen_keys: list[str] = []
        self._signed = self._signed_endpoints()
        self._controls = self._control_actions()

    def _signed_endpoints(self) -> dict[str, Signed]:
        return {
            "/fapi/v1/openOrders": (self._open_orders, _weight_by_symbol),
            "/fapi/v1/openAlgoOrders": (self._open_algo_orders, _weight_by_symbol),
            "/fapi/v3/positionRisk": (self._position_risk, _fixed(5)),
            "/fapi/v1/order": (self._get_order, _fixed(1)),
            "/fapi/v1/algoOrder": (self._get_algo_order, _fixed(1)),
            "/fapi/v2/balance": (self._balance, _fixed(5)),
            "/fapi/v1/allOrders": (self._all_orders, _fixed(5)),
            "/fapi/v1/userTrades": (self._user_trades, _fixed(5)),
            "/fapi/v1/symbolConfig": (self._symbol_config, _fixed(5)),
            "/fapi/v1/multiAssetsMargin": (self._multi_assets_margin, _fixed(30)),
        }

    def _control_actions(self) -> dict[str, Control]:
        return {
            "place": self._ctl_place, "fill": self._ctl_fill, "cancel": self._ctl_cancel,
            "expire": self._ctl_expire, "amend": self._ctl_amend, "trigger": self._ctl_trigger,
            "trigger_reject": self._ctl_trigger_reject, "activate": self._ctl_activate,
            "expire_listen_key": self._ctl_expire_listen_key,
            "hedge_mode": self._ctl_hedge_mode, "unknown_event": self._ctl_unknown_event,
            "funding": self._ctl_funding, "mark": self._ctl_mark, "state": self._ctl_state,
            "margin_call": self._ctl_margin_call, "leverage": self._ctl_leverage,
            "multi_assets": self._ctl_multi_assets, "strategy_update": self._ctl_strategy_update,
            "grid_update": self._ctl_grid_update,
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
            return self.listen_key_request(method.upper(), query, headers)
        if path in self._signed:
            return self.signed_request(method.upper(), path, query, headers)
        if path.startswith(CONTROL_PREFIX):
            return self._control(method.upper(), path[len(CONTROL_PREFIX):].strip("/"), body)
        return None

    def signed_request(self, method: str, path: str, query: Mapping[str, str],
                       headers: Mapping[str, str]) -> RestReply:
        handler, weight_of = self._signed[path]
        weight = weight_of(query)
        if method != "GET":
            return _error(405, -1000, f"The simulator serves only GET {path}.", weight)
        try:
            check_api_key(headers, self.api_key)
            self._verifier.check_signature(query)
            check_timestamp(query, self.now_ms())
            return RestReply(200, handler(query), weight)
        except AuthError as err:
            return _error(err.status, err.code, err.msg, weight)
        except LedgerError as err:
            return _error(400, err.code, err.msg, weight)

    def serves(self, path: str) -> bool:
        return path == LISTEN_KEY_PATH or path in self._signed

    # ---- listenKey ---------------------------------------------------------------------------
    def listen_key_request(self, method: str, query: Mapping[str, str],
                           headers: Mapping[str, str]) -> RestReply:
        try:
            check_api_key(headers, self.api_key)
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

    def listen_key_live(self) -> bool:
        return self._key_live()

    def key_is_live(self, key: str) -> bool:
        return bool(key) and key == self._listen_key and self._key_live()

    def _create_or_extend(self) -> str:
        """Binance: a POST while a key is live returns that key and extends it."""
        if not self._key_live() or self._listen_key is None:
            self._listen_key = "".join(secrets.choice(_ALNUM) for _ in range(64))
            self.issued_listen_keys.append(self._listen_key)
        self._key_expires = self._clock() + self.config.listen_key_ttl
        self._notify()
        return self._listen_key

    def _close_key(self) -> None:
        """DELETE: the key is gone and every connection on it is closed (code 4001)."""
        for sub in [s for s in self._subscribers if s.listen_key == self._listen_key]:
            sub.connection.close(userstream.KEY_GONE_CODE, "listenKey has been closed")
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

    async def serve_user_ws(self, ws: Any, query: Mapping[str, str]) -> None:
        """Serve one `/private/ws?listenKey=K&events=E1/E2` connection on this account."""
        wanted = userstream.Wanted(query.get("listenKey", ""),
                                   userstream.parse_events(query.get("events", "")))
        await userstream.serve(ws, [(self, wanted)], combined=False)

    def attach(self, sub: userstream.Subscriber) -> None:
        self._subscribers.add(sub)
        self._notify()

    def detach(self, sub: userstream.Subscriber) -> None:
        self._subscribers.discard(sub)
        self._notify()

    async def expire_when_due(self, key: str) -> None:
        """The key's TTL ran out without a PUT: Binance announces listenKeyExpired."""
        while self._listen_key == key:
            remaining = self._key_expires - self._clock()
            if remaining <= 0:
                self.expire_listen_key()
                return
            with trio.move_on_after(remaining):
                await self._changed.wait()

    def notify(self) -> None:
        """Something outside the account changed (the clock moved): re-check what is due."""
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _push(self, events: list[Event]) -> None:
        """Fan events out to the connections open now on the live key; no queue for others."""
        for event in events:
            text = orjson.dumps(event).decode()
            for sub in list(self._subscribers):
                if sub.listen_key == self._listen_key and sub.wants(event.get("e")):
                    sub.connection.offer(sub.listen_key, event, text)

    # ---- signed REST views -------------------------------------------------------------------
    def _symbol_filter(self, query: Mapping[str, str]) -> str | None:
        symbol = query.get("symbol") or None
        if symbol is not None and symbol.upper() not in self.ledger.symbols:
            raise LedgerError(-1121, "Invalid symbol.")
        return symbol.upper() if symbol else None

    def _algo_json(self, algo: AlgoOrder) -> object:
        return wire.rest_algo_order(algo, self.ledger.linked_order(algo),
                                    legacy=self.config.legacy_algo_rows)

    def _open_orders(self, query: Mapping[str, str]) -> object:
        orders = self.ledger.open_orders(self._symbol_filter(query))
        return [wire.rest_order(o) for o in sorted(orders, key=lambda o: o.order_id)]

    def _open_algo_orders(self, query: Mapping[str, str]) -> object:
        algos = self.ledger.open_algos(self._symbol_filter(query))
        return [self._algo_json(a) for a in sorted(algos, key=lambda a: a.algo_id)]

    def _position_risk(self, query: Mapping[str, str]) -> object:
        only = self._symbol_filter(query)
        wallet = self.ledger.balances["USDT"]
        return [wire.position_risk(self.ledger.position(s, side), self.ledger.mark(s), wallet,
                                   self.ledger.open_notional(s), self.ledger.leverage_of(s))
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
        if not history.order_found(order, self.now_ms()):
            raise LedgerError(-2013, "Order does not exist.")
        return wire.rest_order(order)

    def _get_algo_order(self, query: Mapping[str, str]) -> object:
        algo_id, client_id = query.get("algoId"), query.get("clientAlgoId")
        if not algo_id and not client_id:
            raise LedgerError(-1102, "Param 'clientAlgoId' or 'algoId' must be sent, but both "
                                     "were empty/null!")
        algo = self.ledger.find_algo(algo_id, client_id)
        linked = self.ledger.linked_order(algo)
        filled = linked is not None and linked.executed > 0
        if not history.still_found(algo.status, filled, algo.create_time, self.now_ms()):
            raise LedgerError(-2013, "Order does not exist.")
        return self._algo_json(algo)

    def _all_orders(self, query: Mapping[str, str]) -> object:
        rows = history.all_orders(self.ledger.orders.values(), self._symbol_filter(query), query,
                                  self.now_ms())
        return [wire.rest_order(o) for o in rows]

    def _user_trades(self, query: Mapping[str, str]) -> object:
        symbol = self._symbol_filter(query)
        if symbol is None:
            raise LedgerError(-1102, "Mandatory parameter 'symbol' was not sent, was "
                                     "empty/null, or malformed.")
        rows = history.user_trades(self.ledger.trades, symbol, query, self.now_ms())
        return [wire.user_trade(t) for t in rows]

    def _symbol_config(self, query: Mapping[str, str]) -> object:
        only = self._symbol_filter(query)
        return [wire.symbol_config(s, self.ledger.leverage_of(s))
                for s in self.ledger.symbols if only in (None, s)]

    def _multi_assets_margin(self, query: Mapping[str, str]) -> object:
        return {"multiAssetsMargin": self.ledger.multi_assets}

    def _balance(self, query: Mapping[str, str]) -> object:
        upnl, now = self.ledger.unrealized_total(), self.now_ms()
        return [wire.balance_row(asset, wallet, upnl, now)
                for asset, wallet in self.ledger.balances.items()]

    def state(self) -> dict[str, object]:
        """What the REST endpoints would return now, plus the simulator's own facts."""
        return {
            "account": self.name,
            "openOrders": self._open_orders({}), "openAlgoOrders": self._open_algo_orders({}),
            "positions": self._position_risk({}), "balances": self._balance({}),
            "symbolConfig": self._symbol_config({}),
            "multiAssetsMargin": self.ledger.multi_assets,
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
        return _control_reply(lambda: self.control(name, _parse_body(raw)))

    def _apply(self, result: tuple[list[Event], Any]) -> Any:
        events, changed = result
        self._push(events)
        return changed

    def _order_json(self, order_id: int) -> object:
        return wire.rest_order(self.ledger.orders[order_id])

    def _ctl_place(self, body: dict[str, Any]) -> object:
        placed = self._apply(self.ledger.place(PlaceRequest.from_json(body), self.now_ms()))
        if isinstance(placed, AlgoOrder):
            return self._algo_json(placed)
        return self._order_json(placed.order_id)

    def _ctl_fill(self, body: dict[str, Any]) -> object:
        qty = dec(body["quantity"], "quantity") if body.get("quantity") else None
        price = dec(body["price"], "price") if body.get("price") else None
        order = self._apply(self.ledger.fill(_id(body, "orderId"), qty, price, self.now_ms()))
        return self._order_json(order.order_id)

    def _end(self, body: dict[str, Any], status: str) -> object:
        if body.get("algoId") is not None:
            algo = self._apply(self.ledger.end_algo(_id(body, "algoId"), status, self.now_ms()))
            return self._algo_json(algo)
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
        return self._algo_json(algo)

    def _ctl_trigger_reject(self, body: dict[str, Any]) -> object:
        """The trigger fires and the matching engine refuses the order; `legacy: true` also
        pushes the CONDITIONAL_ORDER_TRIGGER_REJECT event Binance deprecated on 2025-12-15."""
        reason = str(body.get("reason") or "Reduce Only reject")
        algo = self._apply(self.ledger.reject_trigger(_id(body, "algoId"), reason,
                                                      self.now_ms(), _truthy(body.get("legacy"))))
        return self._algo_json(algo)

    def _ctl_activate(self, body: dict[str, Any]) -> object:
        algo = self._apply(self.ledger.activate(_id(body, "algoId"), self.now_ms()))
        return self._algo_json(algo)

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
        symbol = self._symbol(body)
        self.ledger.pinned[symbol] = dec(body.get("price"), "price")
        return {"symbol": symbol, "markPrice": wire.fmt(self.ledger.mark(symbol))}

    def _ctl_state(self, body: dict[str, Any]) -> object:
        return self.state()

    def _ctl_margin_call(self, body: dict[str, Any]) -> object:
        symbol = self._symbol(body) if body.get("symbol") else None
        events = self.ledger.margin_call(symbol, self.now_ms())
        self._push(events)
        return events[0]

    def _ctl_leverage(self, body: dict[str, Any]) -> object:
        symbol = self._symbol(body)
        self._push(self.ledger.set_leverage(symbol, _id(body, "leverage"), self.now_ms()))
        return wire.symbol_config(symbol, self.ledger.leverage_of(symbol))

    def _ctl_multi_assets(self, body: dict[str, Any]) -> object:
        self._push(self.ledger.set_multi_assets(_truthy(body.get("on", True)), self.now_ms()))
        return {"multiAssetsMargin": self.ledger.multi_assets}

    def _ctl_strategy_update(self, body: dict[str, Any]) -> object:
        """STRATEGY_UPDATE (a grid strategy's status and opCode, Binance's shape)."""
        status = str(body.get("status", "NEW")).upper()
        if status not in STRATEGY_STATUSES:
            raise LedgerError(-1102, f"status must be one of {sorted(STRATEGY_STATUSES)}.")
        event = wire.strategy_update(self._strategy_id(body), self._symbol(body), status,
                                     int(body.get("opCode", 8007)), self.now_ms(),
                                     str(body.get("strategyType", "GRID")))
        self._push([event])
        return event

    def _ctl_grid_update(self, body: dict[str, Any]) -> object:
        """GRID_UPDATE (a grid's sub order filled; marked deprecated by Binance)."""
        def num(name: str) -> Decimal:
            try:
                return Decimal(str(body.get(name, "0")))
            except InvalidOperation:
                raise LedgerError(-1102, f"Parameter '{name}' was malformed.") from None

        event = wire.grid_update(
            self._strategy_id(body), self._symbol(body), str(body.get("status", "WORKING")),
            num("realized"), num("unmatchedAvgPrice"), num("unmatchedQty"), num("unmatchedFee"),
            num("matchedProfit"), self.now_ms())
        self._push([event])
        return event

    def _symbol(self, body: Mapping[str, Any]) -> str:
        symbol = str(body.get("symbol", "")).upper()
        if symbol not in self.ledger.symbols:
            raise LedgerError(-1121, "Invalid symbol.")
        return symbol

    def _strategy_id(self, body: Mapping[str, Any]) -> int:
        if body.get("strategyId") is not None:
            return _id(body, "strategyId")
        self._next_strategy_id += 1
        return self._next_strategy_id - 1

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


class Accounts:
    """Every simulated account, routed by API key, listenKey and control-body name (module doc).

    `clock`, `weight` and `faults` are the exchange's own, shared with the market side.
    """

    def __init__(self, config: SimConfig, clock: ExchangeClock | None = None,
                 weight: WeightMeter | None = None, faults: RestFaults | None = None) -> None:
        self.clock = clock or ExchangeClock()
        self.weight = weight or WeightMeter()
        self.faults = faults or RestFaults()
        self.primary = Account(config, self.clock)
        self.all = [self.primary, *(Account(config, self.clock, keys, i)
                                    for i, keys in enumerate(config.accounts, start=1))]
        self._by_name = {a.name: a for a in self.all}
        self._by_key = {a.api_key: a for a in self.all}
        self._controls: dict[str, Control] = {
            "advance_clock": self._ctl_advance_clock, "spend_weight": self._ctl_spend_weight,
            "rest_fault": self._ctl_rest_fault, "clear_rest_faults": self._ctl_clear_faults,
            "accounts": self._ctl_accounts,
        }

    def named(self, name: str) -> Account:
        if name not in self._by_name:
            raise LedgerError(-1000, f"Unknown account {name!r}.")
        return self._by_name[name]

    def set_mark_source(self, source: Callable[[str], str | Decimal | None]) -> None:
        for account in self.all:
            account.set_mark_source(source)

    async def run_script(self) -> None:
        """The demo's scripted activity, on the main account."""
        await self.primary.run_script()

    async def handle_rest(self, method: str, path: str, query: dict[str, str],
                          headers: dict[str, str], body: bytes) -> RestReply | None:
        """Answer a request on an account path; None when the path is not an account's."""
        if path.startswith(CONTROL_PREFIX):
            return self._control(method.upper(), path[len(CONTROL_PREFIX):].strip("/"), query,
                                 body)
        if not self.primary.serves(path):
            return None
        # an unknown key goes to the main account, which refuses it (-2014 / -2015)
        account = self._by_key.get(header(headers, "X-MBX-APIKEY") or "", self.primary)
        return await account.handle_rest(method, path, query, headers, body)

    async def serve_user_ws(self, ws: Any, target: str) -> None:
        """Serve one `/private/ws?...` or `/private/stream?...` connection (`userstream.py`)."""
        combined, wanted = userstream.parse_target(target)
        holders = [(self._holder_of(w.listen_key), w) for w in wanted]
        await userstream.serve(ws, holders, combined)

    def _holder_of(self, key: str) -> Account | None:
        return next((a for a in self.all if a.key_is_live(key)), None)

    # ---- control API -------------------------------------------------------------------------
    def _control(self, method: str, name: str, query: Mapping[str, str],
                 raw: bytes) -> RestReply:
        if name == "state":
            return _control_reply(lambda: self.named(query.get("account", MAIN_ACCOUNT)).state())
        if method != "POST":
            return _error(405, -1000, "Control actions are POSTed with a JSON body.", 0)
        return _control_reply(lambda: self.control(name, _parse_body(raw)))

    def control(self, name: str, body: dict[str, Any]) -> object:
        """One control action in-process: the exchange's, else the named account's."""
        if name in self._controls:
            return self._controls[name](body)
        rest = dict(body)
        account = self.named(str(rest.pop("account", None) or MAIN_ACCOUNT))
        return account.control(name, rest)

    def _ctl_advance_clock(self, body: dict[str, Any]) -> object:
        seconds = float(body["seconds"])
        if seconds <= 0:
            raise LedgerError(-1102, "seconds must be > 0.")
        self.clock.advance(seconds)
        for account in self.all:
            account.notify()
        return {"serverTime": int(self.clock() * 1000), "offsetSeconds": self.clock.offset}

    def _ctl_spend_weight(self, body: dict[str, Any]) -> object:
        """Weight used by another client on the same IP (COIN-M shares the budget)."""
        weight = int(body["weight"])
        if weight < 0:
            raise LedgerError(-1102, "weight must be >= 0.")
        self.weight.force(weight, self.clock())
        return {"weight_used_1m": self.weight.current(self.clock())}

    def _ctl_rest_fault(self, body: dict[str, Any]) -> object:
        self.faults.add(RestFault.from_json(body))
        return {"faults": [f.summary() for f in self.faults.active]}

    def _ctl_clear_faults(self, body: dict[str, Any]) -> object:
        return {"cleared": self.faults.clear(body.get("path") or None)}

    def _ctl_accounts(self, body: dict[str, Any]) -> object:
        return [{"account": a.name, "listenKeyLive": a.listen_key_live(),
                 "userStreams": a.connection_count()} for a in self.all]


def _id(body: Mapping[str, Any], name: str) -> int:
    try:
        return int(body[name])
    except (KeyError, TypeError, ValueError):
        raise LedgerError(-1102, f"Mandatory parameter '{name}' was not sent, was empty/null, "
                                 "or malformed.") from None


def _truthy(value: object) -> bool:
    return value is True or str(value).lower() == "true"


def _as_dict(value: object) -> dict[str, Any]:
    assert isinstance(value, dict)
    return value
