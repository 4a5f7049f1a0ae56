"""The listeners' consumers: `XREADGROUP` on the streams the projector appends to, instead of
polling. Plain redis-py, no Trio.

- `OrdersConsumer` on `P:orders`: every order and algo-order change (`OrderEvent`);
- `AccountEventsConsumer` on `P:account_events`: margin calls, leverage and Multi-Assets
  changes, rejected triggers, strategy and grid updates (`AccountEvent`);
- `PositionEventsConsumer` on `P:position_events`: a position opened, grown, reduced,
  flipped or closed, with its cause (`PositionEvent`).

All three are one machine (`StreamConsumer`): a consumer group created on first use, each
entry handed to the handler and acknowledged only after it returns, entries a dead consumer
left pending taken over after `claim_idle_ms`. Delivery is at-least-once: handlers should be
idempotent (key on `entry_id`, or on the event's own key: `event_key`).

Example (see examples/position_listener.py)::

    def on_position(ev: PositionEvent) -> None:
        if ev.kind == "closed" and ev.algo_type == "STOP_MARKET":
            print(ev.symbol, "closed by its stop-loss, profit", ev.realized_profit)

    PositionEventsConsumer(r, group="risk", handler=on_position).run()
"""

from __future__ import annotations

import concurrent.futures
import logging
import socket
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import attrs
import redis

from pipeline.redisconn import error_code, is_cluster
from projections.client.views import parse_view
from projections.core.keys import DEFAULT_PREFIX, Keys

log = logging.getLogger("projections.client")

Fields = dict[bytes, bytes]


def _json(raw: bytes | None) -> dict[str, Any]:
    return parse_view(raw) or {}


def _text(fields: Fields, name: str) -> str:
    return fields.get(name.encode(), b"").decode()


def _opt(value: object) -> str | None:
    return None if value is None else str(value)


@attrs.frozen
class OrderEvent:
    """One entry of `P:orders`: an order or algo order changed state.

    `data` is the order's whole state after the change, as the projector stores it (JSON):
    `status`, `symbol`, `source`, `update_time` and `created_time` (ms), `version`, and `o`, the
    order's fields under Binance's ORDER_TRADE_UPDATE / ALGO_UPDATE names (`o["q"]` quantity,
    `o["p"]` price, `o["l"]`/`o["L"]` last fill, ...; after a reconciliation, the REST row's
    fields under those names). An order's state adds `cum_filled`, `avg_price`, `cum_quote`
    and `realized_profit`; an algo order's adds `actual_order_id` (the matching-engine order it
    placed when triggered, "" before). The properties below read these. Quantities and prices
    are the strings Binance sent (`Decimal(ev.filled_qty)` for arithmetic).

    Example::

        def on_order(ev: OrderEvent) -> None:
            if ev.kind == "order" and ev.status in ("PARTIALLY_FILLED", "FILLED"):
                print(ev.order_id, ev.filled_qty, "filled at", ev.avg_price,
                      "last", ev.last_filled_qty, "@", ev.last_filled_price)
            elif ev.kind == "algo" and ev.status == "TRIGGERED":
                print("stop", ev.order_id, "placed order", ev.actual_order_id)
    """

    entry_id: str
    order_id: str
    status: str
    symbol: str
    kind: str  # "order" or "algo"
    source: str  # "stream" or "reconciliation"
    data: dict[str, Any]

    @classmethod
    def from_entry(cls, entry_id: bytes, fields: Fields) -> OrderEvent:
        return cls(entry_id.decode(), _text(fields, "order_id"), _text(fields, "status"),
                   _text(fields, "symbol"), _text(fields, "kind") or "order",
                   _text(fields, "source") or "stream", _json(fields.get(b"data")))

    @property
    def fields(self) -> dict[str, Any]:
        """The order's fields under Binance's event names (`data["o"]`). Example:
        `ev.fields.get("S")` is the side, "BUY" or "SELL"."""
        o = self.data.get("o")
        return o if isinstance(o, dict) else {}

    @property
    def filled_qty(self) -> str | None:
        """An order's cumulative filled quantity ("0" before any fill); None for an algo
        order. Example: `Decimal(ev.filled_qty) == Decimal(ev.fields["q"])` once FILLED."""
        return _opt(self.data.get("cum_filled"))

    @property
    def avg_price(self) -> str | None:
        """An order's average fill price ("0" before any fill); None for an algo order.
        Example: `print(f"{ev.filled_qty} @ {ev.avg_price}")`."""
        return _opt(self.data.get("avg_price"))

    @property
    def last_filled_qty(self) -> str | None:
        """The quantity of the fill this event reports (`o["l"]`); None when the event came
        from a REST reconciliation, which reports totals only. Example: `ev.last_filled_qty`."""
        return _opt(self.fields.get("l")) if self.source == "stream" else None

    @property
    def last_filled_price(self) -> str | None:
        """The price of the fill this event reports (`o["L"]`); None as `last_filled_qty`.
        Example: `ev.last_filled_price`."""
        return _opt(self.fields.get("L")) if self.source == "stream" else None

    @property
    def actual_order_id(self) -> str | None:
        """For a triggered algo order, the id of the order it placed (follow that order's own
        events); None before the trigger and for plain orders. Example:
        `if ev.kind == "algo" and ev.actual_order_id: watch(ev.actual_order_id)`."""
        return _opt(self.data.get("actual_order_id")) or None


@attrs.frozen
class AccountEvent:
    """One entry of `P:account_events`: `type` is the user-data event type (`MARGIN_CALL`,
    `ACCOUNT_CONFIG_UPDATE`, `CONDITIONAL_ORDER_TRIGGER_REJECT`, `STRATEGY_UPDATE`,
    `GRID_UPDATE`), `symbol` the one symbol it names (None when it names none or several),
    `data` the event's JSON exactly as Binance sent it, `event_key` its name (the same for
    every copy of one event).

    Example::

        def on_account(ev: AccountEvent) -> None:
            if ev.type == "MARGIN_CALL":
                for p in ev.margin_call_positions:
                    print("margin call", p["s"], "maintenance margin", p["mm"])
            elif ev.leverage is not None:
                print(ev.symbol, "leverage now", ev.leverage)
    """

    entry_id: str
    type: str
    symbol: str | None
    event_key: str
    data: dict[str, Any]

    @classmethod
    def from_entry(cls, entry_id: bytes, fields: Fields) -> AccountEvent:
        return cls(entry_id.decode(), _text(fields, "type"), _text(fields, "symbol") or None,
                   _text(fields, "event_key"), _json(fields.get(b"data")))

    @property
    def event_time(self) -> int:
        """`E`, ms. Example: `datetime.fromtimestamp(ev.event_time / 1000, UTC)`."""
        return int(self.data.get("E") or 0)

    @property
    def margin_call_positions(self) -> list[dict[str, Any]]:
        """A MARGIN_CALL's positions at risk (`p`: `s`, `ps`, `pa`, `mt`, `iw`, `mp`, `up`,
        `mm`), [] for any other event. Example: `{p["s"] for p in ev.margin_call_positions}`."""
        rows = self.data.get("p") if self.type == "MARGIN_CALL" else None
        return [p for p in rows if isinstance(p, dict)] if isinstance(rows, list) else []

    @property
    def leverage(self) -> int | None:
        """The new leverage of an ACCOUNT_CONFIG_UPDATE `ac`, else None. Example:
        `if ev.leverage and ev.leverage > 20: warn(ev.symbol)`."""
        ac = self.data.get("ac")
        return ac.get("l") if isinstance(ac, dict) and isinstance(ac.get("l"), int) else None

    @property
    def multi_assets_margin(self) -> bool | None:
        """The new Multi-Assets mode of an ACCOUNT_CONFIG_UPDATE `ai`, else None. Example:
        `ev.multi_assets_margin is True`."""
        ai = self.data.get("ai")
        return ai.get("j") if isinstance(ai, dict) and isinstance(ai.get("j"), bool) else None


STOP_LOSS_TYPES = frozenset({"STOP_MARKET", "STOP"})
TAKE_PROFIT_TYPES = frozenset({"TAKE_PROFIT_MARKET", "TAKE_PROFIT"})


@attrs.frozen
class PositionEvent:
    """One entry of `P:position_events`: a position changed.

    `kind`: `opened`, `increased`, `reduced`, `flipped` (the side changed in one step),
    `closed`, or `changed` (the projector did not know the position before). `source`:
    `websocket` (from ACCOUNT_UPDATE and the fills of the same moment) or `reconciliation`
    (a REST snapshot after an outage showed a change the stream did not carry: no order).
    `data` holds every field (docs/contract.md): amounts before and after, entry prices, the
    fills' realized profit, the order, and the triggered algo order behind it.

    Example::

        def on_position(ev: PositionEvent) -> None:
            if ev.kind == "closed" and ev.by_stop_loss:
                print(ev.symbol, "stopped out by algo", ev.algo_id, "pnl", ev.realized_profit)
            elif ev.kind == "closed" and ev.source == "reconciliation":
                print(ev.symbol, "closed while the stream was down")
    """

    entry_id: str
    kind: str
    symbol: str
    position_side: str  # BOTH (one-way mode), LONG, SHORT
    source: str  # "websocket" or "reconciliation"
    data: dict[str, Any]

    @classmethod
    def from_entry(cls, entry_id: bytes, fields: Fields) -> PositionEvent:
        return cls(entry_id.decode(), _text(fields, "kind"), _text(fields, "symbol"),
                   _text(fields, "position_side") or "BOTH",
                   _text(fields, "source") or "websocket", _json(fields.get(b"data")))

    @property
    def amount_before(self) -> str | None:
        """Signed amount before the change; None when the projector did not know it."""
        return _opt(self.data.get("amount_before"))

    @property
    def amount_after(self) -> str:
        """Signed amount after the change ("0" once closed). Example: `Decimal(ev.amount_after)`."""
        return str(self.data.get("amount_after", "0"))

    @property
    def entry_price(self) -> str:
        """Entry price after the change ("0" once closed; `entry_price_before` in `data`)."""
        return str(self.data.get("entry_price", "0"))

    @property
    def realized_profit(self) -> str | None:
        """Sum of the realized profit (`rp`) of the fills that made the change; None when no
        fill is known (a reconciliation, a funding fee). Example: `Decimal(ev.realized_profit)`."""
        return _opt(self.data.get("realized_profit"))

    @property
    def order_id(self) -> int | None:
        """The order whose fill made the change. Example: `orders[ev.order_id]`."""
        value = self.data.get("order_id")
        return value if isinstance(value, int) else None

    @property
    def algo_id(self) -> int | None:
        """The algo (conditional) order whose trigger placed that order, when known."""
        value = self.data.get("algo_id")
        return value if isinstance(value, int) else None

    @property
    def algo_type(self) -> str | None:
        """That algo order's type: STOP_MARKET, TAKE_PROFIT_MARKET, STOP, TAKE_PROFIT or
        TRAILING_STOP_MARKET; None when no algo order placed the order."""
        return _opt(self.data.get("algo_type"))

    @property
    def by_stop_loss(self) -> bool:
        """A stop-loss (STOP_MARKET or STOP) made the change. Example:
        `if ev.kind == "closed" and ev.by_stop_loss: alert(ev.symbol)`."""
        return self.algo_type in STOP_LOSS_TYPES

    @property
    def by_take_profit(self) -> bool:
        """A take-profit (TAKE_PROFIT_MARKET or TAKE_PROFIT) made the change."""
        return self.algo_type in TAKE_PROFIT_TYPES


E = TypeVar("E")
Entries = list[tuple[bytes, Fields]]


class StreamConsumer(Generic[E]):
    """A consumer group's loop on one stream of the projector (module docstring).

    Each poll first takes over entries another consumer of the group left idle
    `claim_idle_ms` (`XAUTOCLAIM`), then re-delivers its own pending ones, then waits up to
    `block_ms` for new ones. A new group starts at `start_id`: `$` (only what comes after its
    creation) or `0` (the whole stream). The client is used as redis-py makes it by default
    (RESP2 replies). Subclasses name the stream and the event type."""

    def __init__(self, r: redis.Redis, stream: str | Sequence[str],
                 parse: Callable[[bytes, Fields], E], *,
                 group: str, handler: Callable[[E], object], consumer: str | None = None,
                 claim_idle_ms: int = 30_000, block_ms: int = 1_000, count: int = 100,
                 start_id: str = "$") -> None:
        streams = [stream] if isinstance(stream, str) else list(stream)
        self.r = r
        self.stream = streams[0]
        self.group = group
        self.consumer = consumer or f"{socket.gethostname()}-{id(self):x}"
        self.handler = handler
        self.parse = parse
        self.claim_idle_ms = claim_idle_ms
        self.block_ms = block_ms
        self.count = count
        self._stopped = False
        self._waits: concurrent.futures.ThreadPoolExecutor | None = None
        self._waiting: dict[int, concurrent.futures.Future[Entries]] = {}
        self._ensure_group(start_id)
        # several streams (the orders partitions of a cluster): the group on each, same consumer
        self._others = [StreamConsumer(r, s, parse, group=group, handler=handler,
                                       consumer=self.consumer, claim_idle_ms=claim_idle_ms,
                                       block_ms=block_ms, count=count, start_id=start_id)
                        for s in streams[1:]]

    @property
    def streams(self) -> list[str]:
        """The streams this consumer reads: one, or every partition's."""
        return [self.stream, *(p.stream for p in self._others)]

    def _ensure_group(self, start_id: str) -> None:
        try:
            self.r.xgroup_create(self.stream, self.group, id=start_id, mkstream=True)
        except redis.ResponseError as exc:
            if error_code(exc) != "BUSYGROUP":
                raise

    def stop(self) -> None:
        """Ask `run()` to return after the current poll (callable from a signal handler)."""
        self._stopped = True

    def run(self) -> None:
        """Poll until `stop()`, then `close()`."""
        try:
            while not self._stopped:
                self.poll_once()
        finally:
            self.close()

    def close(self) -> None:
        """Wait for the reads still out (several streams: at most `block_ms`) and end their
        threads. What they delivered and nobody handled stays pending for this consumer."""
        if self._waits is not None:
            self._waits.shutdown(wait=True)
            self._waits = None
        self._waiting.clear()

    def poll_once(self) -> int:
        """Handle what is due now: taken-over entries, our own pending ones, then new ones
        (waiting up to `block_ms`). Returns how many entries were acknowledged.

        Several streams (the orders partitions of a cluster, each in its own slot, so no one
        XREADGROUP reads them all): each one's due entries without waiting, then, only when
        none had any, a blocking read on every partition at once, each in a thread of its
        own (`_wait_all`), so an entry on any partition is handled as soon as it comes."""
        if not self._others:
            done = self._handle(self._claim_abandoned())
            done += self._handle(self._read("0"))
            done += self._handle(self._read(">", block=self.block_ms))
            return done
        parts = [self, *self._others]
        done = 0
        for i, p in enumerate(parts):
            if i in self._waiting:  # a read of it is still out: its entries come from there
                continue
            done += p._handle(p._claim_abandoned())
            done += p._handle(p._read("0"))
            done += p._handle(p._read(">"))
        if done:
            return done
        return self._wait_all(parts)

    def _wait_all(self, parts: list[StreamConsumer[E]]) -> int:
        """A blocking read on each partition that has none out, then the entries of the first
        ones to answer, in the caller's thread. A read still out when this returns stays out:
        its entries (already delivered to this consumer) are handled by a later poll, before
        that partition is read again, so a partition's entries keep their order and none is
        handled twice. Entries of reads left out when the process stops stay pending for
        this consumer and are delivered again (`_read("0")`) or taken over by another."""
        if self._waits is None:
            self._waits = concurrent.futures.ThreadPoolExecutor(
                max_workers=len(parts), thread_name_prefix="stream-consumer")
        for i, p in enumerate(parts):
            if i not in self._waiting:
                self._waiting[i] = self._waits.submit(p._read, ">", self.block_ms)
        finished, _ = concurrent.futures.wait(
            list(self._waiting.values()), timeout=self.block_ms / 1000 + 1.0,
            return_when=concurrent.futures.FIRST_COMPLETED)
        done = 0
        for i in [i for i, f in self._waiting.items() if f in finished]:
            future = self._waiting.pop(i)
            done += parts[i]._handle(future.result())
        return done

    def _claim_abandoned(self) -> Entries:
        reply: Any = self.r.xautoclaim(self.stream, self.group, self.consumer,
                                       self.claim_idle_ms, "0-0", count=self.count)
        return [(eid, fields) for eid, fields in reply[1] if fields]

    def _read(self, start: str, block: int | None = None) -> Entries:
        reply: Any = self.r.xreadgroup(self.group, self.consumer, {self.stream: start},
                                       count=self.count, block=block)
        if not reply:
            return []
        return [(eid, fields) for eid, fields in reply[0][1] if fields]

    def _handle(self, entries: Entries) -> int:
        done = 0
        for entry_id, fields in entries:
            event = self.parse(entry_id, fields)
            try:
                self.handler(event)
            except Exception:
                # Not acknowledged: stays pending and is delivered again (here or elsewhere).
                log.exception("handler failed; entry stays pending",
                              extra={"stream": self.stream, "entry": entry_id.decode()})
                continue
            self.r.xack(self.stream, self.group, entry_id)
            done += 1
        return done


class OrdersConsumer(StreamConsumer[OrderEvent]):
    """Consume `P:orders` in a consumer group: the order listener's replacement for polling.

    Each entry is handed to `handler(event)`; it is acknowledged only after the handler
    returns. A handler that raises leaves the entry pending: this consumer retries it on its
    next poll, and if this process dies, another consumer of the group takes it over once it
    has been idle `claim_idle_ms`. Delivery is therefore at-least-once: handlers should be
    idempotent (key on `event.entry_id` or on order id + status).

    Example (see examples/order_listener.py)::

        def on_order(ev: OrderEvent) -> None:
            if ev.status == "FILLED":
                print("filled", ev.symbol, ev.order_id, ev.filled_qty, "at", ev.avg_price)

        OrdersConsumer(r, group="listener", handler=on_order).run()
        OrdersConsumer(r, group="listener", handler=on_order, account="a1").run()

    `account="a1"` consumes that account's stream, `P:acct:a1:orders` (a group there is that
    account's own: the ACL user `listener-a1` may run groups on it and read nothing of another
    account). The client is used as redis-py makes it by default (RESP2 replies).

    Redis Cluster (`r` a `redis.cluster.RedisCluster`): the orders stream is partitioned
    (`P:orders:{o0}` ... `P:orders:{o3}`, a symbol's events all in one partition), and this
    consumer runs the group on every partition: each poll takes what each partition has
    without waiting, and only when none had anything waits on all of them at once (a
    blocking read per partition, each in a thread: an event on any partition is handled as
    soon as it comes, in the thread that called `poll_once`). Events of one symbol arrive in
    order; events of two symbols in different partitions may arrive in another order than the
    projector wrote them.
    """

    def __init__(self, r: redis.Redis, *, group: str, handler: Callable[[OrderEvent], object],
                 prefix: str = DEFAULT_PREFIX, account: str | None = None,
                 **options: Any) -> None:
        streams = Keys(prefix, account=account, cluster=is_cluster(r)).orders_partitions()
        super().__init__(r, streams, OrderEvent.from_entry, group=group, handler=handler,
                         **options)


class AccountEventsConsumer(StreamConsumer[AccountEvent]):
    """Consume `P:account_events` in a consumer group, as `OrdersConsumer` does `P:orders`.

    Example::

        def on_account(ev: AccountEvent) -> None:
            if ev.type == "MARGIN_CALL":
                page_someone(ev.symbol, ev.margin_call_positions)

        AccountEventsConsumer(r, group="risk", handler=on_account).run()

    `account="a1"`: that account's stream, `P:acct:a1:account_events`.
    """

    def __init__(self, r: redis.Redis, *, group: str,
                 handler: Callable[[AccountEvent], object], prefix: str = DEFAULT_PREFIX,
                 account: str | None = None, **options: Any) -> None:
        super().__init__(r, Keys(prefix, account=account).account_events(),
                         AccountEvent.from_entry, group=group, handler=handler, **options)


class PositionEventsConsumer(StreamConsumer[PositionEvent]):
    """Consume `P:position_events` in a consumer group, as `OrdersConsumer` does `P:orders`.

    Example::

        def on_position(ev: PositionEvent) -> None:
            if ev.kind == "closed" and ev.by_stop_loss:
                print(ev.symbol, "stopped out", ev.realized_profit)

        PositionEventsConsumer(r, group="risk", handler=on_position).run()

    `account="a1"`: that account's stream, `P:acct:a1:position_events`.
    """

    def __init__(self, r: redis.Redis, *, group: str,
                 handler: Callable[[PositionEvent], object], prefix: str = DEFAULT_PREFIX,
                 account: str | None = None, **options: Any) -> None:
        super().__init__(r, Keys(prefix, account=account).position_events(),
                         PositionEvent.from_entry, group=group, handler=handler, **options)
