"""Settings of the gateway's server limits, and how aiohttp's parse errors are answered."""

from __future__ import annotations

import json

import pytest
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    BadStatusLine,
    ContentEncodingError,
    InvalidHeader,
    LineTooLong,
    TransferEncodingError,
)
from hypothesis import given
from hypothesis import strategies as st

from relay.core.config import ConfigError, Settings
from relay.web.server import low_level_error

SECRET = "tok_0123456789abcdef"


def test_limits_have_safe_defaults() -> None:
    s = Settings.from_env({})
    assert s.header_timeout_s == 10
    assert s.body_timeout_s == 30
    assert s.max_connections == 1000
    assert s.worker_metrics_host == "127.0.0.1"


def test_limits_are_read_from_the_environment() -> None:
    s = Settings.from_env(
        {
            "RELAY_HEADER_TIMEOUT_S": "2.5",
            "RELAY_BODY_TIMEOUT_S": "7",
            "RELAY_MAX_CONNECTIONS": "50",
            "RELAY_WORKER_METRICS_HOST": "0.0.0.0",
        }
    )
    assert (s.header_timeout_s, s.body_timeout_s, s.max_connections) == (2.5, 7, 50)
    assert s.worker_metrics_host == "0.0.0.0"


def test_database_waits_have_bounds() -> None:
    s = Settings.from_env({})
    assert (s.ingest_max_waiting, s.db_acquire_timeout_s, s.db_statement_timeout_s) == (1000, 5, 5)
    s = Settings.from_env(
        {
            "RELAY_INGEST_MAX_WAITING": "20",
            "RELAY_DB_ACQUIRE_TIMEOUT_S": "0.5",
            "RELAY_DB_STATEMENT_TIMEOUT_S": "2",
        }
    )
    assert (s.ingest_max_waiting, s.db_acquire_timeout_s, s.db_statement_timeout_s) == (20, 0.5, 2)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RELAY_INGEST_MAX_WAITING", "0"),
        ("RELAY_INGEST_MAX_WAITING", "many"),
        ("RELAY_DB_ACQUIRE_TIMEOUT_S", "0"),
        ("RELAY_DB_STATEMENT_TIMEOUT_S", "-1"),
        ("RELAY_HEADER_TIMEOUT_S", "0"),
        ("RELAY_HEADER_TIMEOUT_S", "soon"),
        ("RELAY_BODY_TIMEOUT_S", "-1"),
        ("RELAY_MAX_CONNECTIONS", "0"),
        ("RELAY_MAX_CONNECTIONS", "1.5"),
        ("RELAY_WORKER_METRICS_HOST", "metrics.example"),
    ],
)
def test_bad_limit_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (LineTooLong(f"/in/src_x?token={SECRET}"[:100].encode() + b"...", 8190), 431),
        (BadHttpMessage("Too many headers received"), 431),
        (ContentEncodingError("Can not decode content-encoding: br. Please install `Brotli`"), 400),
        (TransferEncodingError(f"bad chunk {SECRET}"), 400),
        (BadHttpMethod(f"G\x00T /in/src_x?token={SECRET}"), 400),
        (BadStatusLine(f"GET /in/src_x?token={SECRET} HTTP/9"), 400),
        (InvalidHeader(f"Authorization: Bearer {SECRET}".encode()), 400),
    ],
)
def test_parse_errors_are_answered_without_the_request_bytes(exc: Exception, status: int) -> None:
    error = low_level_error(exc)
    assert error.status == status
    assert error.code == "invalid_request"
    assert SECRET not in json.dumps(error.body())


@given(st.text(alphabet="0123456789abcdef", min_size=12))
def test_no_parse_error_message_quotes_the_request(text: str) -> None:
    for exc in (BadHttpMessage(text), LineTooLong(text.encode(), 8190), BadStatusLine(text)):
        assert text not in low_level_error(exc).message
