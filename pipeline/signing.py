"""Signed REST requests (Binance "SIGNED" endpoints): the query, its signature, the clock.

Binance's rules (USD-M futures, 2026):
- a SIGNED request carries `timestamp` (ms) and optionally `recvWindow` (ms, default 5000, at
  most 60000) among its parameters, then `signature` computed over the query string exactly as
  sent (`totalParams`, without `signature` itself);
- HMAC-SHA256 keys: `signature` is the lower-case hex HMAC of the query with the API secret;
- Ed25519 keys: `signature` is the base64 Ed25519 signature of the query with the private key
  (percent-encoded on the wire, which the HTTP client does);
- the server accepts when `timestamp < serverTime + 1000` and
  `serverTime - timestamp <= recvWindow`, else -1021; a bad signature is -1022.

A local clock a few seconds off would get every request refused with -1021, so the offset to
`GET /fapi/v1/time` is measured at start (and again after a -1021) and added to every timestamp.

Which kind of key: `BINANCE_API_SECRET` holding a PEM private key (`-----BEGIN PRIVATE KEY`)
is an Ed25519 key; anything else is an HMAC secret.

The pure part (`signed_params`, `ServerClock`, the signers) imports neither trio nor httpx; the
thin `SignedRest` shell sends through `pipeline.rest.RestClient`, so weight is counted there.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol
from urllib.parse import urlencode

import attrs
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from pipeline.config import Secret
from pipeline.errors import ExchangeError, SettingsError
from pipeline.rest import BadAnswer, RestClient

DEFAULT_RECV_WINDOW_MS = 5000
MAX_RECV_WINDOW_MS = 60_000
CODE_TIMESTAMP_OUTSIDE_WINDOW = -1021


class Signer(Protocol):
    def sign(self, payload: str) -> str: ...


@attrs.frozen(repr=False)
class HmacSigner:
    secret: Secret

    def sign(self, payload: str) -> str:
        return hmac.new(self.secret.value.encode(), payload.encode(), hashlib.sha256).hexdigest()

    def __repr__(self) -> str:
        return "HmacSigner(***)"


@attrs.frozen(repr=False)
class Ed25519Signer:
    key: Ed25519PrivateKey

    def sign(self, payload: str) -> str:
        return base64.b64encode(self.key.sign(payload.encode())).decode()

    def __repr__(self) -> str:
        return "Ed25519Signer(***)"


def make_signer(secret: Secret) -> Signer:
    """An Ed25519 signer for a PEM private key, else an HMAC-SHA256 signer.

    A PEM that is not an Ed25519 key is a SettingsError naming BINANCE_API_SECRET (the message
    never holds the key itself).
    """
    text = secret.value.strip()
    if not text.startswith("-----BEGIN"):
        return HmacSigner(secret)
    try:
        key = load_pem_private_key(text.encode(), password=None)
    except (ValueError, TypeError):
        raise SettingsError("BINANCE_API_SECRET", "is a PEM block that cannot be read") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SettingsError("BINANCE_API_SECRET", "is a PEM key but not an Ed25519 one")
    return Ed25519Signer(key)


def signed_params(
    params: Mapping[str, Any] | None,
    *,
    timestamp_ms: int,
    signer: Signer,
    recv_window_ms: int = DEFAULT_RECV_WINDOW_MS,
) -> dict[str, str]:
    """The request's parameters in sending order (dicts keep it), `signature` last.

    The signature covers `urlencode` of the pairs before it; the HTTP client encodes the same
    pairs the same way (plain symbols, ids and numbers need no escaping), so what is signed is
    what is sent.
    """
    if not 0 < recv_window_ms <= MAX_RECV_WINDOW_MS:
        raise ValueError(f"recvWindow {recv_window_ms} outside 1..{MAX_RECV_WINDOW_MS}")
    pairs = [(k, str(v)) for k, v in (params or {}).items() if v is not None]
    pairs += [("timestamp", str(timestamp_ms)), ("recvWindow", str(recv_window_ms))]
    return dict([*pairs, ("signature", signer.sign(urlencode(pairs)))])


@attrs.define
class ServerClock:
    """Local time plus the measured offset to the exchange's clock, in ms."""

    clock: Callable[[], float] = time.time
    offset_ms: int = 0

    def now_ms(self) -> int:
        return int(self.clock() * 1000) + self.offset_ms

    def observe(self, server_time_ms: int, sent_at: float, received_at: float) -> None:
        """Take the offset from one `GET /fapi/v1/time`: the server read its clock about half
        way between our send and our receipt."""
        midpoint_ms = (sent_at + received_at) * 500
        self.offset_ms = round(server_time_ms - midpoint_ms)


class SignedRest:
    """Signed and API-key requests over a RestClient (which counts and respects weight)."""

    def __init__(self, rest: RestClient, api_key: Secret, signer: Signer, *,
                 recv_window_ms: int = DEFAULT_RECV_WINDOW_MS) -> None:
        self.rest = rest
        self.api_key = api_key
        self.signer = signer
        self.recv_window_ms = recv_window_ms
        self.server_clock = ServerClock(rest.clock)

    @property
    def _headers(self) -> dict[str, str]:
        return {"X-MBX-APIKEY": self.api_key.value}

    async def sync_time(self) -> int:
        """Measure the offset to the exchange's clock; returns it in ms. An answer without an
        integer `serverTime` is a BadAnswer, like any body that is not the expected JSON."""
        sent = self.rest.clock()
        body = await self.rest.get("/fapi/v1/time", expect=dict)
        server_time = body.get("serverTime")
        if not isinstance(server_time, int) or isinstance(server_time, bool):
            raise BadAnswer("GET /fapi/v1/time: answer holds no serverTime", status=200)
        self.server_clock.observe(server_time, sent, self.rest.clock())
        return self.server_clock.offset_ms

    async def keyed(self, method: str, path: str, params: Mapping[str, Any] | None = None,
                    weight: int | None = None, *, essential: bool = False) -> Any:
        """An API-key request without a signature (listenKey endpoints; `essential`: see
        `pipeline.weight`)."""
        return await self.rest.request(method, path, params=params, headers=self._headers,
                                       weight=weight, essential=essential, expect=dict)

    async def signed(self, method: str, path: str, params: Mapping[str, Any] | None = None,
                     weight: int | None = None, *, expect: type | None = None) -> Any:
        """A SIGNED request; on -1021 the clock is measured again and the request sent once
        more (a fresh timestamp needs a fresh signature). `expect`: the JSON type of a good
        answer (anything else is a BadAnswer)."""
        try:
            return await self._send_signed(method, path, params, weight, expect)
        except ExchangeError as exc:
            if exc.code != CODE_TIMESTAMP_OUTSIDE_WINDOW:
                raise
        await self.sync_time()
        return await self._send_signed(method, path, params, weight, expect)

    async def _send_signed(self, method: str, path: str, params: Mapping[str, Any] | None,
                           weight: int | None, expect: type | None) -> Any:
        query = signed_params(params, timestamp_ms=self.server_clock.now_ms(),
                              signer=self.signer, recv_window_ms=self.recv_window_ms)
        return await self.rest.request(method, path, params=query, headers=self._headers,
                                       weight=weight, expect=expect)
