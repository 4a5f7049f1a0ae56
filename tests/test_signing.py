"""Signed REST requests: the signature Binance expects, the clock offset, the key kinds."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlencode

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from pipeline.config import Secret
from pipeline.errors import ExchangeError, SettingsError
from pipeline.rest import RestClient
from pipeline.signing import (
    Ed25519Signer,
    HmacSigner,
    ServerClock,
    SignedRest,
    make_signer,
    signed_params,
)
from pipeline.simulator import SimConfig, Simulator

# The worked example of Binance's API documentation (SIGNED endpoint, HMAC-SHA256).
DOC_SECRET = "NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j"
DOC_QUERY = ("symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC&quantity=1&price=0.1"
             "&recvWindow=5000&timestamp=1499827319559")
DOC_SIGNATURE = "c8db56825ae71d6d79447849e617115f4a920fa2acdcab2b053c4b2838bd6b71"


def _pem(key: Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()


def test_hmac_signature_matches_binance_documentation_example() -> None:
    assert HmacSigner(Secret(DOC_SECRET)).sign(DOC_QUERY) == DOC_SIGNATURE


def test_signed_params_sign_exactly_the_query_that_precedes_the_signature() -> None:
    signer = HmacSigner(Secret("s3cret-value"))
    params = signed_params({"symbol": "BTCUSDT", "orderId": 42}, timestamp_ms=1_700_000_000_123,
                           signer=signer, recv_window_ms=6000)
    assert list(params) == ["symbol", "orderId", "timestamp", "recvWindow", "signature"]
    sent = urlencode([(k, v) for k, v in params.items() if k != "signature"])
    assert sent == "symbol=BTCUSDT&orderId=42&timestamp=1700000000123&recvWindow=6000"
    expected = hmac.new(b"s3cret-value", sent.encode(), hashlib.sha256).hexdigest()
    assert params["signature"] == expected


def test_none_parameters_are_left_out_of_the_signed_query() -> None:
    params = signed_params({"symbol": None}, timestamp_ms=1, signer=HmacSigner(Secret("abcdef")))
    assert "symbol" not in params


def test_recv_window_beyond_binance_maximum_is_refused() -> None:
    with pytest.raises(ValueError, match="recvWindow"):
        signed_params({}, timestamp_ms=1, signer=HmacSigner(Secret("abcdef")),
                      recv_window_ms=60_001)


def test_ed25519_signature_verifies_with_the_public_key() -> None:
    key = Ed25519PrivateKey.generate()
    signer = make_signer(Secret(_pem(key)))
    assert isinstance(signer, Ed25519Signer)
    payload = "symbol=BTCUSDT&timestamp=1&recvWindow=5000"
    key.public_key().verify(base64.b64decode(signer.sign(payload)), payload.encode())


def test_plain_secret_makes_an_hmac_signer() -> None:
    assert isinstance(make_signer(Secret("sim-api-secret")), HmacSigner)


def test_pem_key_of_another_kind_is_a_settings_error_without_the_key() -> None:
    pem = _pem(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(SettingsError) as info:
        make_signer(Secret(pem))
    assert info.value.setting == "BINANCE_API_SECRET"
    assert "PRIVATE KEY" not in str(info.value)


def test_signers_never_show_their_key() -> None:
    key = Ed25519PrivateKey.generate()
    assert "s3cret" not in repr(HmacSigner(Secret("s3cret-value")))
    assert "BEGIN" not in repr(make_signer(Secret(_pem(key))))


def test_server_clock_offset_is_taken_at_the_midpoint_of_the_round_trip() -> None:
    now = [1000.0]
    clock = ServerClock(lambda: now[0])
    # sent at 1000.0 s, answered at 1000.2 s, the server read 1003.1 s: 3 s ahead of us
    clock.observe(1_003_100, sent_at=1000.0, received_at=1000.2)
    assert clock.offset_ms == 3000
    assert clock.now_ms() == 1_003_000


def test_server_clock_behind_gives_a_negative_offset() -> None:
    clock = ServerClock(lambda: 2000.0)
    clock.observe(1_997_000, sent_at=2000.0, received_at=2000.0)
    assert clock.now_ms() == 1_997_000


# --- against the simulator over real HTTP ------------------------------------------------------

@asynccontextmanager
async def signed_api(secret: str, *, shift_s: float = 0.0, public_pem: str | None = None,
                     recv_window_ms: int = 5000) -> AsyncIterator[SignedRest]:
    """A SignedRest talking to a simulator whose clock runs `shift_s` ahead of ours."""
    sim = Simulator(SimConfig(symbols=("BTCUSDT",), ed25519_public_key_pem=public_pem),
                    clock=lambda: time.time() + shift_s)
    async with trio.open_nursery() as nursery:
        _, rest_url = await nursery.start(sim.run)
        rest = RestClient(rest_url)
        try:
            yield SignedRest(rest, Secret("sim-api-key"), make_signer(Secret(secret)),
                             recv_window_ms=recv_window_ms)
        finally:
            await rest.aclose()
            nursery.cancel_scope.cancel()


async def test_hmac_signed_request_is_accepted_by_the_simulator() -> None:
    async with signed_api("sim-api-secret") as api:
        assert await api.signed("GET", "/fapi/v1/openOrders", weight=40) == []
        assert await api.signed("GET", "/fapi/v1/openOrders", {"symbol": "BTCUSDT"}) == []


async def test_ed25519_signed_request_is_accepted_by_the_simulator() -> None:
    key = Ed25519PrivateKey.generate()
    public_pem = key.public_key().public_bytes(
        Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
    async with signed_api(_pem(key), public_pem=public_pem) as api:
        positions = await api.signed("GET", "/fapi/v3/positionRisk", weight=5)
        assert isinstance(positions, list)


async def test_wrong_secret_is_refused_with_1022_and_the_error_holds_no_secret() -> None:
    async with signed_api("not-the-secret") as api:
        with pytest.raises(ExchangeError) as info:
            await api.signed("GET", "/fapi/v2/balance", weight=5)
    assert info.value.code == -1022
    assert "not-the-secret" not in str(info.value) and "signature=" not in str(info.value)


@pytest.mark.parametrize("shift_s", [3.0, -3.0])
async def test_exchange_clock_off_by_3_s_is_measured_and_requests_pass(shift_s: float) -> None:
    # a 2 s window: without the offset every request would be refused with -1021
    async with signed_api("sim-api-secret", shift_s=shift_s, recv_window_ms=2000) as api:
        offset = await api.sync_time()
        assert abs(offset - shift_s * 1000) < 500
        assert await api.signed("GET", "/fapi/v1/openAlgoOrders", weight=40) == []


async def test_request_refused_with_1021_measures_the_clock_and_is_sent_again() -> None:
    async with signed_api("sim-api-secret", shift_s=-3.0, recv_window_ms=2000) as api:
        assert api.server_clock.offset_ms == 0
        assert await api.signed("GET", "/fapi/v1/openOrders", weight=40) == []
        assert api.server_clock.offset_ms < -2500
