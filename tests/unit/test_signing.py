"""Standard Webhooks signatures: the published vector and the reference libraries agree with us."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import standardwebhooks
import svix.webhooks
from hypothesis import given
from hypothesis import strategies as st

from relay.delivery.signing import SignatureError, sign_payload, signature_header, verify

VECTORS = Path(__file__).resolve().parents[3] / "shared" / "vectors" / "standard-webhooks.json"
# The published vector, inlined so the test runs even where shared/ is not beside the repo.
PUBLISHED = {
    "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    "webhook_id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
    "webhook_timestamp": "1614265330",
    "body": '{"test": 2432232314}',
    "webhook_signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
}


def _vectors() -> list[dict[str, str]]:
    if VECTORS.exists():
        vectors: list[dict[str, str]] = json.loads(VECTORS.read_text())["vectors"]
        assert PUBLISHED in vectors
        return vectors
    return [PUBLISHED]


@pytest.mark.parametrize("vector", _vectors())
def test_published_vectors(vector: dict[str, str]) -> None:
    signature = sign_payload(
        vector["secret"],
        vector["webhook_id"],
        int(vector["webhook_timestamp"]),
        vector["body"].encode(),
    )
    assert signature == vector["webhook_signature"]


secrets_ = st.binary(min_size=16, max_size=64).map(
    lambda b: "whsec_" + base64.b64encode(b).decode()
)
ids = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40)
bodies = st.dictionaries(
    st.text(max_size=10), st.integers() | st.text(max_size=20), max_size=5
).map(lambda d: json.dumps(d).encode())


@given(
    secret=secrets_, msg_id=ids, timestamp=st.integers(1_600_000_000, 2_000_000_000), body=bodies
)
def test_reference_libraries_verify_our_signatures(
    secret: str, msg_id: str, timestamp: int, body: bytes
) -> None:
    headers = {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign_payload(secret, msg_id, timestamp, body),
    }
    # Pin "now" to the timestamp: the libraries check a 5-minute tolerance.
    sw = standardwebhooks.Webhook(secret)
    expected = sw.sign(msg_id, _dt(timestamp), body.decode())
    assert headers["webhook-signature"] == expected
    svix_expected = svix.webhooks.Webhook(secret).sign(msg_id, _dt(timestamp), body.decode())
    assert headers["webhook-signature"] == svix_expected


def _dt(ts: int):  # type: ignore[no-untyped-def]
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC)


@given(old=secrets_, new=secrets_, body=bodies)
def test_rotation_header_verifies_with_either_secret(old: str, new: str, body: bytes) -> None:
    header = signature_header([new, old], "evt_1", 1_700_000_000, body)
    assert len(header.split(" ")) == 2
    for secret in (old, new):
        verify(secret, "evt_1", "1700000000", header, body, now=1_700_000_010)


def test_live_libraries_accept_a_fresh_signature() -> None:
    import time

    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    now = int(time.time())
    body = b'{"uuid":"1","objectType":"Bill"}'
    headers = {
        "webhook-id": "evt_x",
        "webhook-timestamp": str(now),
        "webhook-signature": signature_header([secret], "evt_x", now, body),
    }
    standardwebhooks.Webhook(secret).verify(body, headers)
    svix.webhooks.Webhook(secret).verify(body, headers)


@given(secret=secrets_, body=bodies, tamper=st.binary(min_size=1, max_size=5))
def test_verify_refuses_tampering(secret: str, body: bytes, tamper: bytes) -> None:
    header = sign_payload(secret, "m", 1_700_000_000, body)
    with pytest.raises(SignatureError):
        verify(secret, "m", "1700000000", header, body + tamper, now=1_700_000_000)
    with pytest.raises(SignatureError):
        verify(secret, "m", "1700000000", header, body, now=1_700_000_000 + 301)
    with pytest.raises(SignatureError):
        verify(secret, "m", "1700000000", header.replace("v1,", "v2,"), body, now=1_700_000_000)
    with pytest.raises(SignatureError):
        verify(secret, "m", "soon", header, body, now=1_700_000_000)
