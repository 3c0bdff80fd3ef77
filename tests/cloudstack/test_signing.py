"""moldd checks signatures exactly as CloudStack computes them: proven against the real ``cs`` client's signer."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cs.client import CloudStack

from moldd.api.cloudstack.signing import (
    SignatureError,
    check_expiry,
    java_urlencode,
    parse_expires,
    sign,
    signature_matches,
)

SECRET = "s3cr3t-K3y_with-URLsafe-chars"
VALUES = [
    "plain",
    "with space",
    "a+b=c&d",
    "ünïcödé ✓",
    "tilde~star*dot.dash-under_",
    "/slashes/and?question",
    "",
    "100%",
]


def cs_signed(params: dict[str, str]) -> dict[str, str]:
    signed = dict(params)
    CloudStack(endpoint="http://x/client/api", key="k", secret=SECRET)._sign(signed)
    return signed


@pytest.mark.parametrize("value", VALUES)
def test_signature_of_cs_client_matches(value: str) -> None:
    params = {"command": "listVirtualMachines", "apiKey": "KEY", "response": "json", "name": value,
              "signatureVersion": "3", "expires": "2030-01-01T00:00:00+0000"}  # fmt: skip
    signed = cs_signed(params)
    assert signature_matches(signed, SECRET, signed["signature"])


@pytest.mark.parametrize("value", VALUES)
def test_wrong_secret_or_changed_parameter_is_refused(value: str) -> None:
    params = {"command": "stopVirtualMachine", "apiKey": "KEY", "id": "vm-1", "x": value}
    signed = cs_signed(params)
    assert not signature_matches(signed, SECRET + "x", signed["signature"])
    changed = dict(signed, id="vm-2")
    assert not signature_matches(changed, SECRET, signed["signature"])
    assert not signature_matches(signed, SECRET, "")
    assert not signature_matches(signed, SECRET, "ünicode-garbage")


def test_sign_matches_cs_without_tilde() -> None:
    params = {"command": "deployVirtualMachine", "apiKey": "A", "name": "web 1", "details[0].cpu": "2"}
    assert sign(params, SECRET) == cs_signed(params)["signature"]


def test_java_urlencode_is_javas() -> None:
    # java.net.URLEncoder.encode(s, "UTF-8").replace("+", "%20")
    assert java_urlencode("a b+c*d~e.f-g_h") == "a%20b%2Bc*d%7Ee.f-g_h"
    assert java_urlencode("é") == "%C3%A9"


NOW = datetime(2026, 11, 30, 18, 0, tzinfo=UTC)


def test_expired_request_is_refused() -> None:
    params = {"signatureVersion": "3", "expires": "2026-11-30T17:59:59+0000"}
    with pytest.raises(SignatureError, match="expired"):
        check_expiry(params, NOW, max_ahead=timedelta(hours=1))


def test_expiry_far_ahead_is_refused() -> None:
    params = {"signatureversion": "3", "expires": "2026-12-30T18:00:00+0000"}
    with pytest.raises(SignatureError, match="ahead"):
        check_expiry(params, NOW, max_ahead=timedelta(hours=1))


@pytest.mark.parametrize(
    "params",
    [
        {"signatureVersion": "3"},
        {"signatureVersion": "2", "expires": "2026-11-30T18:10:00+0000"},
        {"signatureVersion": "3", "expires": "tomorrow"},
        {"signatureVersion": "3", "expires": "2026-11-30T18:10:00"},  # no zone
        {"expires": "2026-11-30T18:10:00+0000"},
    ],
)
def test_malformed_expiry_is_refused(params: dict[str, str]) -> None:
    with pytest.raises(SignatureError):
        check_expiry(params, NOW, max_ahead=timedelta(hours=1))


def test_valid_expiry_passes_and_formats_parse() -> None:
    check_expiry({"signatureVersion": "3", "expires": "2026-11-30T18:09:00+0000"}, NOW, max_ahead=timedelta(hours=1))
    assert parse_expires("2026-11-30T18:09:00Z") == parse_expires("2026-11-30T19:09:00+0100")
    check_expiry({}, NOW, max_ahead=timedelta(hours=1))
    with pytest.raises(SignatureError):
        check_expiry({}, NOW, max_ahead=timedelta(hours=1), require=True)
