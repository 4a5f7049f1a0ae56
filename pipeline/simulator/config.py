"""The simulator's settings: one frozen value shared by the market side and the account side."""

from __future__ import annotations

from collections.abc import Iterable

import attrs


def _symbols(value: Iterable[str] | str) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    return tuple(dict.fromkeys(s.strip().upper() for s in items if s.strip()))


def _positive(_inst: object, attribute: attrs.Attribute, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value!r}")


def _rate(_inst: object, _attribute: attrs.Attribute, value: float | None) -> None:
    if value is not None and value < 0:
        raise ValueError(f"rate must be None or >= 0, got {value!r}")


@attrs.frozen
class SimConfig:
    """What the simulated exchange serves and how fast.

    `rate`: None sends each stream kind at Binance's own speed (markPrice@1s once a second,
    depth@100ms ten times a second, ...); a number is frames per second per connection, shared
    round-robin over that connection's streams; 0 sends as fast as the socket takes them.
    `burst` extra frames are added every `burst_every` seconds on top of that.
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
    api_secret: str = "sim-api-secret"
    ed25519_public_key_pem: str | bytes | None = None
    listen_key_ttl: float = 3600.0
    hedge_mode: bool = False
    script_account: bool = False
