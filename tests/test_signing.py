"""Signed REST requests: the signature Binance expects, the clock offset, the key kinds."""

from __future__ import annotations

import base64
import hashlib
import hmac
from urllib.parse import urlencode

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)

from pipeline.config import Secret
from pipeline.errors import SettingsError
from pipeline.signing import (
    Ed25519Signer,
    HmacSigner,
    ServerClock,
    make_signer,
    signed_params,
)

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
