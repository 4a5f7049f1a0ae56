"""How the simulated exchange checks a SIGNED request, by Binance's rules. Pure: no trio, no I/O.

Order of checks, as Binance answers them: the API key header (-2014 missing, -2015 wrong), the
signature (-1022), then the time window (-1021): a request is accepted when
`timestamp < server_time + 1000` and `server_time - timestamp <= recvWindow` (default 5000, at
most 60000). The signed payload is the query string without `signature`. We receive the query
already parsed, so the payload is re-encoded from the parsed pairs in their order; both common
encodings (`quote_plus`, `quote`) are tried so that any ordinary client's bytes match.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping
from urllib.parse import quote, quote_plus, urlencode

import attrs
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

DEFAULT_RECV_WINDOW = 5000
MAX_RECV_WINDOW = 60000


class AuthError(Exception):
    """A refused request: HTTP status, Binance code and message."""

    def __init__(self, status: int, code: int, msg: str) -> None:
        self.status = status
        self.code = code
        self.msg = msg
        super().__init__(f"{code}: {msg}")


def header(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive header lookup (h11 hands us lower-case names, tests may not)."""
    lowered = name.lower()
    for key, value in headers.items():
        if key.lower() == lowered:
            return value
    return None


def check_api_key(headers: Mapping[str, str], api_key: str) -> None:
    sent = header(headers, "X-MBX-APIKEY")
    if not sent:
        raise AuthError(401, -2014, "API-key format invalid.")
    if not hmac.compare_digest(sent.encode(), api_key.encode()):
        raise AuthError(401, -2015, "Invalid API-key, IP, or permissions for action.")


def signed_payloads(query: Mapping[str, str]) -> list[bytes]:
    pairs = [(k, v) for k, v in query.items() if k != "signature"]
    return [urlencode(pairs, quote_via=via).encode() for via in (quote_plus, quote)]


@attrs.frozen
class Verifier:
    """Checks signatures with the account's HMAC secret, or its Ed25519 public key if set."""

    api_secret: str
    ed25519_key: Ed25519PublicKey | None = None

    @classmethod
    def from_config(cls, api_secret: str, ed25519_pem: str | bytes | None) -> Verifier:
        if ed25519_pem is None:
            return cls(api_secret)
        pem = ed25519_pem.encode() if isinstance(ed25519_pem, str) else ed25519_pem
        key = load_pem_public_key(pem)
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("ed25519_public_key_pem is not an Ed25519 public key")
        return cls(api_secret, key)

    def check_signature(self, query: Mapping[str, str]) -> None:
        signature = query.get("signature")
        if not signature or not any(self._valid(p, signature) for p in signed_payloads(query)):
            raise AuthError(400, -1022, "Signature for this request is not valid.")

    def _valid(self, payload: bytes, signature: str) -> bool:
        if self.ed25519_key is None:
            expected = hmac.new(self.api_secret.encode(), payload, hashlib.sha256).hexdigest()
            return hmac.compare_digest(expected, signature.lower())
        try:
            self.ed25519_key.verify(base64.b64decode(signature, validate=True), payload)
        except (InvalidSignature, binascii.Error, ValueError):
            return False
        return True


def check_timestamp(query: Mapping[str, str], server_ms: int) -> None:
    try:
        timestamp = int(query["timestamp"])
    except (KeyError, ValueError):
        raise AuthError(400, -1102, "Mandatory parameter 'timestamp' was not sent, was "
                                    "empty/null, or malformed.") from None
    try:
        window = int(query.get("recvWindow") or DEFAULT_RECV_WINDOW)
    except ValueError:
        raise AuthError(400, -1102, "Parameter 'recvWindow' was malformed.") from None
    if not 0 < window <= MAX_RECV_WINDOW:
        raise AuthError(400, -1131, "recvWindow must be less than 60000")
    if timestamp >= server_ms + 1000:
        raise AuthError(400, -1021, "Timestamp for this request was 1000ms ahead of the "
                                    "server's time.")
    if server_ms - timestamp > window:
        raise AuthError(400, -1021, "Timestamp for this request is outside of the recvWindow.")
