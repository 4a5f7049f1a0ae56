"""The simulator's settings: one frozen value shared by the market side and the account side."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import attrs

MAIN_ACCOUNT = "main"  # the name of the account made of api_key/api_secret


def _symbols(value: Iterable[str] | str) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    return tuple(dict.fromkeys(s.strip().upper() for s in items if s.strip()))


def _positive(_inst: object, attribute: attrs.Attribute, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value!r}")


@attrs.frozen
class AccountKeys:
    """One more simulated account: its name (for the control API) and its key material."""

    name: str
    api_key: str
    api_secret: str = attrs.field(repr=False)

    @classmethod
    def parse(cls, text: str) -> AccountKeys:
        """`NAME:API_KEY:API_SECRET`, the form of `pipeline simulate --account`."""
        parts = text.split(":", 2)
        if len(parts) != 3 or not all(p.strip() for p in parts):
            raise ValueError("account must be given as NAME:API_KEY:API_SECRET")
        return cls(*(p.strip() for p in parts))


def _accounts(value: Iterable[AccountKeys | str]) -> tuple[AccountKeys, ...]:
    return tuple(a if isinstance(a, AccountKeys) else AccountKeys.parse(a) for a in value)


def _distinct_accounts(inst: SimConfig, _attribute: attrs.Attribute,
                       value: tuple[AccountKeys, ...]) -> None:
    names = [MAIN_ACCOUNT, *(a.name for a in value)]
    keys = [inst.api_key, *(a.api_key for a in value)]
    if len(set(names)) != len(names):
        raise ValueError(f"account names must be distinct ({MAIN_ACCOUNT!r} is the first's)")
    if len(set(keys)) != len(keys):
        raise ValueError("account API keys must be distinct")


def _rate(_inst: object, _attribute: attrs.Attribute, value: float | None) -> None:
    if value is not None and value < 0:
        raise ValueError(f"rate must be None or >= 0, got {value!r}")


def _one_of(*choices: str) -> Callable[[object, attrs.Attribute, str], None]:
    def check(_inst: object, attribute: attrs.Attribute, value: str) -> None:
        if value not in choices:
            raise ValueError(f"{attribute.name} must be one of {', '.join(choices)}, "
                             f"got {value!r}")
    return check


def _not_negative(_inst: object, attribute: attrs.Attribute, value: float | None) -> None:
    if value is not None and value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value!r}")


def _cadence_alone(inst: SimConfig, _attribute: attrs.Attribute, value: bool) -> None:
    if value and (inst.rate is not None or inst.burst):
        raise ValueError("cadence paces every stream itself: leave rate and burst unset")


@attrs.frozen
class SimConfig:
    """What the simulated exchange serves and how fast.

    `rate`: None sends each stream kind at Binance's own speed (markPrice@1s once a second,
    depth@100ms ten times a second, ...); a number is frames per second per connection, shared
    round-robin over that connection's streams; 0 sends as fast as the socket takes them.
    `burst` extra frames are added every `burst_every` seconds on top of that.

    The account side: `api_key`/`api_secret` (or `ed25519_public_key_pem`) are the first
    account's, named "main"; `accounts` adds more, each with its own key, books and listenKey.
    GET /fapi/v1/algoOrder and openAlgoOrders rows have Binance's 2026-06-09 shape
    (`actualType`, `actualQty`; no tp/sl trigger and price fields); `legacy_algo_rows` answers
    the shape before it.
    The market's 2026 shape (`pipeline.simulator.market`): `coinm_in_arr` adds `coinm_symbols`
    (COIN-M, `st` = 2) to `!markPrice@arr`, as Binance does since 2026-06-30; `tradfi` lists
    TradFi perpetuals (contractType TRADIFI_PERPETUAL) whose underlying market keeps
    `tradfi_hours` ("weekly": the schedule of `tradfi.py`; "open"/"closed": always in / out of
    session); outside a session they trade thinly, as Binance's do ("thin"), or send nothing
    ("quiet"). `cadence` is the whole-market mode (`cadence.py`): every stream at its own rate,
    heavy-tailed trades, a crash phase multiplying trades and book updates by
    `crash_multiplier`, started `crash_after` seconds in for `crash_seconds` (or over HTTP);
    `market_size` lists generated symbols after `symbols` until there are that many.
    """

    symbols: tuple[str, ...] = attrs.field(default=("BTCUSDT", "ETHUSDT", "SOLUSDT"),
                                           converter=_symbols)
    seed: int = 1
    host: str = "127.0.0.1"
    ws_port: int = 0
    rest_port: int = 0
    lifetime: float = attrs.field(default=86400.0, validator=_positive)
    ping_interval: float = attrs.field(default=180.0, validator=_positive)
    pong_timeout: float = attrs.field(default=600.0, validator=_positive)
    rate: float | None = attrs.field(default=None, validator=_rate)
    burst: int = 0
    burst_every: float = attrs.field(default=0.1, validator=_positive)
    api_key: str = "sim-api-key"
    api_secret: str = attrs.field(default="sim-api-secret", repr=False)
    ed25519_public_key_pem: str | bytes | None = None
    listen_key_ttl: float = 3600.0
    hedge_mode: bool = False
    script_account: bool = False
    accounts: tuple[AccountKeys, ...] = attrs.field(default=(), converter=_accounts,
                                                    validator=_distinct_accounts)
    legacy_algo_rows: bool = False

    # --- the market side's 2026 shape and the whole-market cadence ---
    coinm_in_arr: bool = True
    coinm_symbols: tuple[str, ...] = attrs.field(
        default=("BTCUSD_PERP", "ETHUSD_PERP", "BNBUSD_PERP"), converter=_symbols)
    tradfi: tuple[str, ...] = attrs.field(default=(), converter=_symbols)
    tradfi_hours: str = attrs.field(default="weekly", validator=_one_of("weekly", "open",
                                                                        "closed"))
    tradfi_off_hours: str = attrs.field(default="thin", validator=_one_of("thin", "quiet"))
    cadence: bool = attrs.field(default=False, validator=_cadence_alone)
    market_size: int = attrs.field(default=0, validator=_not_negative)
    crash_multiplier: float = attrs.field(default=5.0, validator=_positive)
    crash_after: float | None = attrs.field(default=None, validator=_not_negative)
    crash_seconds: float = attrs.field(default=60.0, validator=_positive)
