"""What the simulated exchange lists: symbols, their contract types and statuses, and the rows of
`GET /fapi/v1/exchangeInfo`. Pure.

Binance (2026): every row carries `contractType` (PERPETUAL, CURRENT_QUARTER, NEXT_QUARTER,
TRADIFI_PERPETUAL, ...) and `status` (TRADING; a delisted contract is SETTLING, then gone).
Quarterly contracts are named `<pair>_<YYMMDD>` and deliver at 08:00 UTC on that day; TradFi
perpetuals name an equity or a commodity (`underlyingType` EQUITY or COMMODITY) and trade around
the clock while their underlying market keeps sessions (`tradfi.py`). Listings change while the
exchange runs: a new symbol appears as TRADING and its streams start; a delisted one turns
SETTLING and its streams go quiet. COIN-M contracts (`BTCUSD_PERP`) are not listed here, though
since 2026-06-30 `!markPrice@arr` carries their mark prices too.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

import attrs

from pipeline.simulator.book import SymbolSpec
from pipeline.simulator.tradfi import underlying_market

PERPETUAL = "PERPETUAL"
TRADIFI = "TRADIFI_PERPETUAL"
QUARTERS = ("CURRENT_QUARTER", "NEXT_QUARTER")
CONTRACT_TYPES = (PERPETUAL, *QUARTERS, TRADIFI)
TRADING = "TRADING"
SETTLING = "SETTLING"
PERPETUAL_DELIVERY_MS = 4133404800000  # 2100-12-25, Binance's "never" for perpetuals
DEFAULT_ONBOARD_MS = 1569398400000  # 2019-09-25
_QUARTERLY = re.compile(r"^([A-Z0-9]+)_(\d{6})$")


@attrs.define
class Listing:
    symbol: str
    pair: str
    contract_type: str
    underlying_type: str  # COIN, EQUITY, COMMODITY
    onboard_ms: int
    delivery_ms: int
    status: str = TRADING

    @property
    def tradfi_market(self) -> str | None:
        return self.underlying_type if self.contract_type == TRADIFI else None


def _delivery_ms(yymmdd: str) -> int:
    d = datetime.strptime(yymmdd, "%y%m%d").replace(hour=8, tzinfo=UTC)
    return int(d.timestamp() * 1000)


def new_listing(symbol: str, contract_type: str | None, now_ms: int,
                onboard_ms: int = DEFAULT_ONBOARD_MS) -> Listing:
    """A listing for `symbol`; the contract type follows from the name unless given
    (`BTCUSDT_261225`: a quarterly; anything else a perpetual)."""
    m = _QUARTERLY.match(symbol)
    if m:
        pair, delivery = m.group(1), _delivery_ms(m.group(2))
        kind = contract_type or quarter_type(delivery, now_ms)
        if kind not in QUARTERS:
            raise ValueError(f"{symbol} is a quarterly contract, not {kind}")
        return Listing(symbol, pair, kind, "COIN", onboard_ms, delivery)
    kind = contract_type or PERPETUAL
    if kind not in (PERPETUAL, TRADIFI):
        raise ValueError(f"contract type must be one of {', '.join(CONTRACT_TYPES)}; "
                         f"a quarterly is named <pair>_<YYMMDD>, not {symbol!r}")
    underlying = underlying_market(symbol) if kind == TRADIFI else "COIN"
    return Listing(symbol, symbol, kind, underlying, onboard_ms, PERPETUAL_DELIVERY_MS)


def quarter_type(delivery_ms: int, now_ms: int) -> str:
    """CURRENT_QUARTER when the delivery is the first quarterly one from now on."""
    d = datetime.fromtimestamp(now_ms / 1000, UTC)
    month = 3 * ((d.month - 1) // 3 + 1)  # the quarter's last month
    last_friday = _last_friday(d.year, month)
    if last_friday <= now_ms:
        year, month = (d.year + 1, 3) if month == 12 else (d.year, month + 3)
        last_friday = _last_friday(year, month)
    return QUARTERS[0] if delivery_ms <= last_friday else QUARTERS[1]


def _last_friday(year: int, month: int) -> int:
    nxt = datetime(year + (month == 12), month % 12 + 1, 1, 8, tzinfo=UTC)
    day = nxt.timestamp() * 1000 - 86_400_000
    while datetime.fromtimestamp(day / 1000, UTC).weekday() != 4:
        day -= 86_400_000
    return int(day)


def symbol_info(listing: Listing, spec: SymbolSpec) -> dict[str, object]:
    """One row of exchangeInfo's `symbols`."""
    quote = "USDT"
    base = listing.pair.removesuffix(quote)
    return {
        "symbol": listing.symbol, "pair": listing.pair, "contractType": listing.contract_type,
        "deliveryDate": listing.delivery_ms, "onboardDate": listing.onboard_ms,
        "status": listing.status,
        "maintMarginPercent": "2.5000", "requiredMarginPercent": "5.0000",
        "baseAsset": base, "quoteAsset": quote, "marginAsset": quote,
        "pricePrecision": spec.price_decimals, "quantityPrecision": spec.qty_decimals,
        "baseAssetPrecision": 8, "quotePrecision": 8, "underlyingType": listing.underlying_type,
        "underlyingSubType": ["TradFi"] if listing.contract_type == TRADIFI else [],
        "triggerProtect": "0.0500", "liquidationFee": "0.012500", "marketTakeBound": "0.05",
        "filters": [
            {"filterType": "PRICE_FILTER", "tickSize": spec.price_text(spec.tick),
             "minPrice": spec.price_text(spec.tick), "maxPrice": "10000000"},
            {"filterType": "LOT_SIZE", "stepSize": spec.qty_text(spec.step),
             "minQty": spec.qty_text(spec.step), "maxQty": "1000000"},
            {"filterType": "MIN_NOTIONAL", "notional": "5"},
        ],
        "orderTypes": ["LIMIT", "MARKET", "STOP", "STOP_MARKET", "TAKE_PROFIT",
                       "TAKE_PROFIT_MARKET", "TRAILING_STOP_MARKET"],
        "timeInForce": ["GTC", "IOC", "FOK", "GTX", "GTD"],
    }


# Names a whole-market simulator lists after the configured ones, most traded first, so that
# the heavy-tailed trade rates of `cadence.py` (by rank) fall on familiar names.
WELL_KNOWN = (
    "BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT", "DOGEUSDT", "BNBUSDT", "SUIUSDT", "ADAUSDT",
    "LINKUSDT", "AVAXUSDT", "LTCUSDT", "1000PEPEUSDT", "WIFUSDT", "TRXUSDT", "DOTUSDT",
    "ENAUSDT", "NEARUSDT", "AAVEUSDT", "BCHUSDT", "ARBUSDT", "OPUSDT", "APTUSDT", "FILUSDT",
    "TIAUSDT", "ATOMUSDT", "INJUSDT", "UNIUSDT", "ETCUSDT", "SEIUSDT", "HBARUSDT",
)


def market_symbols(configured: tuple[str, ...], size: int) -> tuple[str, ...]:
    """`configured`, then well-known names, then generated ones, until there are `size`."""
    out = dict.fromkeys(configured)
    for s in WELL_KNOWN:
        if len(out) >= size:
            break
        out.setdefault(s)
    n = 0
    while len(out) < size:
        # three or four letters from a counter: stable names, the same for every seed
        a, b, c, d = n % 26, n // 26 % 26, n // 676 % 26, n // 17576
        name = "".join(chr(65 + x) for x in (c, b, a)) + ("" if d == 0 else chr(64 + d))
        out.setdefault(f"{name}USDT")
        n += 1
    return tuple(out)
