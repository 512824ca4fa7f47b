"""Transfer tokens: mint, verify, and every way a token can be wrong."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest

from agents.transfer_token import (
    DEFAULT_TOKEN_LIFETIME_S,
    TokenExpired,
    TokenInvalid,
    TransferClaims,
    default_expiry,
    mint_transfer_token,
    verify_transfer_token,
)

KEY = "source-agent-token"
NOW = 1_700_000_000
EXP = NOW + 3600


def token(key: str = KEY, volume: str = "pgdata", expires_at: int = EXP) -> str:
    return mint_transfer_token(key, volume=volume, transfer_id="mig-1", expires_at=expires_at)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_round_trip() -> None:
    claims = verify_transfer_token(KEY, token(), volume="pgdata", now=NOW)
    assert claims == TransferClaims(volume="pgdata", transfer_id="mig-1", expires_at=EXP)


def test_format_is_the_documented_one() -> None:
    payload_b64, mac_b64 = token().split(".")
    payload = base64.urlsafe_b64decode(payload_b64 + "=" * (-len(payload_b64) % 4))
    assert payload == b'{"exp":1700003600,"tid":"mig-1","v":1,"vol":"pgdata"}'
    expected = hmac.new(
        KEY.encode(), b"volume-migrator transfer token v1\n" + payload, hashlib.sha256
    ).digest()
    assert mac_b64 == b64(expected)
    assert "=" not in payload_b64 + mac_b64


def test_expired() -> None:
    with pytest.raises(TokenExpired) as info:
        verify_transfer_token(KEY, token(), volume="pgdata", now=EXP)
    assert info.value.code == "transfer_token_expired"
    assert info.value.status == 401
    # One second before expiry it is still good.
    verify_transfer_token(KEY, token(), volume="pgdata", now=EXP - 1)


def test_default_lifetime_is_a_day() -> None:
    assert DEFAULT_TOKEN_LIFETIME_S == 86400
    assert default_expiry(NOW) == NOW + 86400


def forged_payload() -> str:
    """Another volume's payload under this token's MAC."""
    mac_b64 = token().split(".")[1]
    other = b'{"exp":1700003600,"tid":"mig-1","v":1,"vol":"other"}'
    return f"{b64(other)}.{mac_b64}"


def resigned(doc: object) -> str:
    """A correctly signed token around any payload: only the payload checks can refuse it."""
    payload = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    mac = hmac.new(
        KEY.encode(), b"volume-migrator transfer token v1\n" + payload, hashlib.sha256
    ).digest()
    return f"{b64(payload)}.{b64(mac)}"


def claims(**change: object) -> str:
    return resigned({"v": 1, "vol": "pgdata", "tid": "x", "exp": EXP} | change)


@pytest.mark.parametrize(
    "tok",
    [
        pytest.param(token(volume="other"), id="wrong-volume"),
        pytest.param(token(volume="PGDATA"), id="volume-case"),
        pytest.param(token(key="another-agent"), id="wrong-key"),
        pytest.param(forged_payload(), id="payload-swapped"),
        pytest.param(token()[:-2], id="mac-truncated"),
        pytest.param(token() + "AA", id="mac-extended"),
        pytest.param(token().replace(".", ""), id="no-dot"),
        pytest.param(token() + ".x", id="three-parts"),
        pytest.param("", id="empty"),
        pytest.param(".", id="dot"),
        pytest.param("garbage", id="garbage"),
        pytest.param("a+b/.c==", id="not-base64url"),
        pytest.param(token().replace(".", " ."), id="whitespace"),
        pytest.param("A" * 5000 + "." + "A" * 43, id="too-long"),
        pytest.param("A.A", id="impossible-length"),
        pytest.param(resigned({"vol": "pgdata", "tid": "x", "exp": EXP}), id="no-version"),
        pytest.param(claims(v=2), id="version-2"),
        pytest.param(claims(exp="9"), id="exp-str"),
        pytest.param(claims(exp=True), id="exp-bool"),
        pytest.param(claims(tid=None), id="tid-null"),
        pytest.param(resigned(["pgdata"]), id="not-object"),
    ],
)
def test_invalid(tok: str) -> None:
    with pytest.raises(TokenInvalid) as info:
        verify_transfer_token(KEY, tok, volume="pgdata", now=NOW)
    assert info.value.code == "transfer_token_invalid"
    assert info.value.status == 401


def test_payload_swapped_is_invalid_for_its_own_volume_too() -> None:
    with pytest.raises(TokenInvalid):
        verify_transfer_token(KEY, forged_payload(), volume="other", now=NOW)


def test_signed_junk_payload_is_invalid() -> None:
    payload = b"not json"
    mac = hmac.new(
        KEY.encode(), b"volume-migrator transfer token v1\n" + payload, hashlib.sha256
    ).digest()
    with pytest.raises(TokenInvalid):
        verify_transfer_token(KEY, f"{b64(payload)}.{b64(mac)}", volume="pgdata", now=NOW)


def test_wrong_volume_wins_over_expiry() -> None:
    with pytest.raises(TokenInvalid):
        verify_transfer_token(KEY, token(volume="other"), volume="pgdata", now=EXP + 10)


@pytest.mark.parametrize(
    ("key", "volume", "transfer_id"), [("", "v", "t"), ("k", "", "t"), ("k", "v", "")]
)
def test_mint_refuses_empty_inputs(key: str, volume: str, transfer_id: str) -> None:
    with pytest.raises(ValueError, match="empty"):
        mint_transfer_token(key, volume=volume, transfer_id=transfer_id, expires_at=EXP)


def test_verify_refuses_an_empty_key() -> None:
    with pytest.raises(ValueError, match="empty"):
        verify_transfer_token("", token(), volume="pgdata", now=NOW)


def test_verify_uses_the_clock_by_default() -> None:
    # Minted a day ahead of the real clock: valid now; minted in the past: expired.
    assert verify_transfer_token(KEY, token(expires_at=default_expiry()), volume="pgdata")
    with pytest.raises(TokenExpired):
        verify_transfer_token(KEY, token(expires_at=NOW), volume="pgdata")
