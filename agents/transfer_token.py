"""Transfer tokens: the coordinator's permission for one target to pull one volume's stream.

Owns minting and verifying the token of docs/protocol.md, section 2: HMAC-SHA256, keyed by the
source agent's own token, over (volume, transfer id, expiry). The source verifies it; the
target carries it without being able to forge another. Pure stdlib; must not import `migrator`
(the coordinator imports this module to mint).

    token   = b64url(payload) "." b64url(mac)        (no padding)
    payload = {"exp": int, "tid": str, "v": 1, "vol": str} as canonical JSON
    mac     = HMAC-SHA256(key, DOMAIN || payload)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import time
from dataclasses import dataclass
from typing import Any, ClassVar

TOKEN_VERSION = 1
# Covers the migration's whole retry window (DESIGN §2); `retry` mints a fresh token, so no
# resume depends on a clock running out mid-transfer.
DEFAULT_TOKEN_LIFETIME_S = 24 * 3600
MAX_TOKEN_LENGTH = 4096
# Domain separation: the key is the agent's API token, so a MAC made here must never be
# mistaken for one made for another purpose with the same key.
_DOMAIN = b"volume-migrator transfer token v1\n"
_B64URL = re.compile(r"[A-Za-z0-9_-]+")


class TokenError(Exception):
    status: ClassVar[int] = 401
    code: ClassVar[str] = "transfer_token_invalid"


class TokenInvalid(TokenError):
    """Malformed, forged, for another volume, or signed with another key."""

    code = "transfer_token_invalid"


class TokenExpired(TokenError):
    """Genuine, for this volume, but past its expiry."""

    code = "transfer_token_expired"


@dataclass(frozen=True, slots=True)
class TransferClaims:
    volume: str
    transfer_id: str
    expires_at: int
    """Unix seconds; the token is valid while now < expires_at."""


def default_expiry(now: int | None = None) -> int:
    """The expiry of a token minted `now` with the default lifetime."""
    return (int(time.time()) if now is None else now) + DEFAULT_TOKEN_LIFETIME_S


def mint_transfer_token(key: str, *, volume: str, transfer_id: str, expires_at: int) -> str:
    """A token allowing a pull of `volume` for `transfer_id` until `expires_at` (Unix s)."""
    if not key:
        raise ValueError("the transfer token key (the source agent's token) is empty")
    if not volume or not transfer_id:
        raise ValueError("volume and transfer_id must be non-empty")
    payload = _canonical(
        {"exp": int(expires_at), "tid": transfer_id, "v": TOKEN_VERSION, "vol": volume}
    )
    return f"{_b64encode(payload)}.{_b64encode(_mac(key, payload))}"


def verify_transfer_token(
    key: str, token: str, *, volume: str, now: int | None = None
) -> TransferClaims:
    """The claims of `token` if it is genuine, for `volume` and unexpired.

    Raises TokenInvalid or TokenExpired. The payload is parsed only after its MAC checked out.
    """
    if not key:
        raise ValueError("the transfer token key (the source agent's token) is empty")
    if len(token) > MAX_TOKEN_LENGTH or token.count(".") != 1:
        raise TokenInvalid("malformed transfer token")
    payload_b64, mac_b64 = token.split(".")
    payload = _b64decode(payload_b64)
    mac = _b64decode(mac_b64)
    if len(mac) != hashlib.sha256().digest_size or not hmac.compare_digest(mac, _mac(key, payload)):
        raise TokenInvalid("transfer token signature does not match")
    claims = _claims(payload)
    if claims.volume != volume:
        raise TokenInvalid("transfer token is for another volume")
    if (int(time.time()) if now is None else now) >= claims.expires_at:
        raise TokenExpired("transfer token has expired")
    return claims


def _mac(key: str, payload: bytes) -> bytes:
    return hmac.new(key.encode("utf-8"), _DOMAIN + payload, hashlib.sha256).digest()


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    # Strict: only the URL-safe alphabet, no padding, no whitespace (b64decode skips junk).
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise TokenInvalid("malformed transfer token")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as e:
        raise TokenInvalid("malformed transfer token") from e


def _claims(payload: bytes) -> TransferClaims:
    try:
        doc = json.loads(payload)
    except ValueError as e:  # a genuine MAC over junk means a bug on the minting side
        raise TokenInvalid("transfer token payload is not JSON") from e
    if not isinstance(doc, dict) or doc.get("v") != TOKEN_VERSION:
        raise TokenInvalid("unsupported transfer token version")
    vol, tid, exp = doc.get("vol"), doc.get("tid"), doc.get("exp")
    if not (
        isinstance(vol, str)
        and isinstance(tid, str)
        and isinstance(exp, int)
        and not isinstance(exp, bool)
    ):
        raise TokenInvalid("transfer token payload has wrong fields")
    return TransferClaims(volume=vol, transfer_id=tid, expires_at=exp)
