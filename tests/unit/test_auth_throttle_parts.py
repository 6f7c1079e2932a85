"""The credential throttle's pure parts: who is counted, how long a failure waits, settings."""

from __future__ import annotations

import pytest

from relay.core.auth_throttle import AuthThrottle, client_address
from relay.core.config import ConfigError, Settings


@pytest.mark.parametrize(
    ("remote", "counted_as"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),
        (None, "unknown"),
    ],
)
def test_an_address_is_counted_by_its_ipv4_or_its_ipv6_64(
    remote: str | None, counted_as: str
) -> None:
    assert client_address(remote) == counted_as


class _NoRedis:
    def register_script(self, script: str) -> object:
        return object()


def test_each_failure_waits_twice_as_long_up_to_sixteen_times_the_first() -> None:
    throttle = AuthThrottle(_NoRedis(), limit=10, window_s=60, delay_s=0.2)
    assert [throttle.delay_for(n) for n in range(1, 8)] == pytest.approx(
        [0.2, 0.4, 0.8, 1.6, 3.2, 3.2, 3.2]
    )


def test_the_settings_are_read_and_checked() -> None:
    settings = Settings.from_env(
        {
            "RELAY_AUTH_FAILURE_LIMIT": "5",
            "RELAY_AUTH_FAILURE_WINDOW_S": "30",
            "RELAY_AUTH_FAILURE_DELAY_S": "0",
        }
    )
    assert (settings.auth_failure_limit, settings.auth_failure_window_s) == (5, 30.0)
    assert settings.auth_failure_delay_s == 0
    with pytest.raises(ConfigError, match="RELAY_AUTH_FAILURE_LIMIT"):
        Settings.from_env({"RELAY_AUTH_FAILURE_LIMIT": "0"})
    with pytest.raises(ConfigError, match="RELAY_AUTH_FAILURE_WINDOW_S"):
        Settings.from_env({"RELAY_AUTH_FAILURE_WINDOW_S": "soon"})
