"""The quota settings: defaults and one clear error per bad value."""

from __future__ import annotations

import pytest

from relay.core.config import ConfigError, Settings

QUOTAS = {
    "RELAY_MAX_TARGETS_PER_TENANT": "max_targets_per_tenant",
    "RELAY_MAX_SOURCES_PER_TENANT": "max_sources_per_tenant",
    "RELAY_MAX_DELIVERIES_PER_REQUEST": "max_deliveries_per_request",
}


def test_defaults() -> None:
    s = Settings.from_env({})
    assert (s.max_targets_per_tenant, s.max_sources_per_tenant, s.max_deliveries_per_request) == (
        100,
        100,
        10_000,
    )


@pytest.mark.parametrize("name", QUOTAS)
def test_set_from_the_environment(name: str) -> None:
    assert getattr(Settings.from_env({name: " 7 "}), QUOTAS[name]) == 7


@pytest.mark.parametrize("name", QUOTAS)
@pytest.mark.parametrize("value", ["0", "-1", "1.5", "ten"])
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"^{name} must be"):
        Settings.from_env({name: value})
