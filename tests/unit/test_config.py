"""Settings: defaults, parsing, and one clear error per bad variable."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.core.config import (
    DEFAULT_RETRY_SCHEDULE,
    REQUIRED_FOR_SERVE,
    ConfigError,
    Settings,
    parse_retry_schedule,
)

KEY = base64.b64encode(b"k" * 32).decode()
FULL = {
    "DATABASE_URL": "postgresql://u@h/db",
    "REDIS_URL": "redis://h:6379/0",
    "RELAY_ADMIN_TOKEN": "a" * 24,
    "RELAY_SECRET_KEY": KEY,
}


def test_defaults_match_api_md() -> None:
    s = Settings.from_env(FULL, required=REQUIRED_FOR_SERVE)
    assert s.broker_url == FULL["REDIS_URL"]
    assert s.public_url == "http://127.0.0.1:8080"
    assert s.allow_private_targets is False
    assert (
        s.retry_schedule == DEFAULT_RETRY_SCHEDULE == (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
    )
    assert s.delivery_timeout_s == 15
    assert s.dns_timeout_s == 2
    assert s.worker_boot_wait_s == 30
    assert s.max_body_bytes == 1_048_576
    assert s.secret_overlap_s == 86_400
    assert s.secret_key == b"k" * 32


def test_secrets_are_not_in_repr() -> None:
    s = Settings.from_env(FULL)
    assert FULL["RELAY_ADMIN_TOKEN"] not in repr(s) and "kkkk" not in repr(s)


@pytest.mark.parametrize("missing", REQUIRED_FOR_SERVE)
def test_missing_required_variable_is_named(missing: str) -> None:
    env = {k: v for k, v in FULL.items() if k != missing}
    with pytest.raises(ConfigError, match=f"^{missing} is required"):
        Settings.from_env(env, required=REQUIRED_FOR_SERVE)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DATABASE_URL", "mysql://x"),
        ("REDIS_URL", "localhost:6379"),
        ("BROKER_URL", "kafka://x"),
        ("RELAY_SECRET_KEY", "not base64!"),
        ("RELAY_SECRET_KEY", base64.b64encode(b"short").decode()),
        ("RELAY_ADMIN_TOKEN", "short"),
        ("RELAY_RETRY_SCHEDULE", "1,x"),
        ("RELAY_RETRY_SCHEDULE", "1,-2"),
        ("RELAY_DELIVERY_TIMEOUT_S", "0"),
        ("RELAY_DNS_TIMEOUT_S", "0"),
        ("RELAY_DNS_TIMEOUT_S", "soon"),
        ("RELAY_WORKER_BOOT_WAIT_S", "-1"),
        ("RELAY_MAX_BODY_BYTES", "1.5"),
        ("RELAY_ALLOW_PRIVATE_TARGETS", "yes"),
        ("RELAY_PUBLIC_URL", "relay.example.com"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({**FULL, name: value})


def test_overrides() -> None:
    s = Settings.from_env(
        {
            **FULL,
            "BROKER_URL": "amqp://guest:guest@h:5672",
            "RELAY_RETRY_SCHEDULE": "0, 0.5,1.25",
            "RELAY_ALLOW_PRIVATE_TARGETS": "1",
            "RELAY_PUBLIC_URL": "https://relay.example.com/",
        }
    )
    assert s.broker_url.startswith("amqp://")
    assert s.retry_schedule == (0, 0.5, 1.25)
    assert s.allow_private_targets is True
    assert s.public_url == "https://relay.example.com"


@given(st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1, max_size=20))
def test_retry_schedule_round_trips(seconds: list[float]) -> None:
    assert parse_retry_schedule(",".join(repr(s) for s in seconds)) == tuple(seconds)


@given(st.text(max_size=30))
def test_retry_schedule_never_crashes(text: str) -> None:
    try:
        schedule = parse_retry_schedule(text)
    except ConfigError:
        return
    assert schedule and all(s >= 0 for s in schedule)
