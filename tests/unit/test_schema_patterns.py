"""Every pattern in the OpenAPI document means the same to every regex engine.

The gateway enforces a field's pattern with pydantic (Rust ``regex``, or Python's
``re`` for lookarounds); the document is read as JSON Schema (ECMA-262); clients
and schemathesis draw values with Python's ``re`` under ``re.ASCII``, reading a
closing ``$`` as the end of the string. A value any of those readings draws as
valid must be valid to the others: seen in CI, schemathesis drew a Basic auth
username holding U+00A0 (not ``\\s`` to ASCII ``re``), which the API refused.
"""

from __future__ import annotations

import re
import sys
from typing import Annotated, Any

import jsonschema_rs
import pydantic
import pydantic_core
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from relay.web.app import all_routes
from relay.web.openapi import _walk, build_openapi

#: What any engine (or ``str.strip``) calls whitespace, plus look-alikes none of them does.
SPACES = sorted(
    {chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()}
    | {"\ufeff", "\u180e", "\u200b", "\u2060"}
)
#: Printable ASCII and the spaces: enough for every pattern to be drawn, spaces often.
ALPHABET = st.sampled_from(
    [chr(c) for c in range(0x21, 0x7F)] + SPACES * 3 + ["\x00", "é", "\U0001f600"]
)


def _patterns() -> list[str]:
    doc = build_openapi(all_routes())
    return sorted({n["pattern"] for n in _walk(doc) if isinstance(n.get("pattern"), str)})


def _as_generators_read(pattern: str) -> re.Pattern[str]:
    """ASCII ``re``, a closing ``$`` meaning the end of the string (schemathesis's reading)."""
    return re.compile(pattern[:-1] + r"\Z" if pattern.endswith("$") else pattern, re.ASCII)


PATTERNS = _patterns()


def _enforced(pattern: str) -> pydantic.TypeAdapter[str]:
    """The pattern as pydantic enforces it: Rust ``regex``, or Unicode ``re`` for lookarounds."""
    field = Annotated[str, pydantic.StringConstraints(pattern=pattern)]
    try:
        return pydantic.TypeAdapter(field)
    except pydantic_core.SchemaError:  # look-around: only Python's engine reads it
        return pydantic.TypeAdapter(field, config=pydantic.ConfigDict(regex_engine="python-re"))


def test_the_document_states_patterns() -> None:
    # the usernames, names and target URLs this test is about are among them
    assert len(PATTERNS) >= 8


@pytest.mark.parametrize("pattern", PATTERNS, ids=[p[:40] for p in PATTERNS])
def test_what_one_engine_draws_every_engine_accepts(pattern: str) -> None:
    enforced = _enforced(pattern)
    schema = jsonschema_rs.validator_for({"type": "string", "pattern": pattern})
    refused: list[tuple[str, str]] = []

    def check(value: str, drawn_by: str) -> None:
        try:
            enforced.validate_python(value)
        except pydantic.ValidationError:
            refused.append((drawn_by + " -> the API", value))
        if not schema.is_valid(value):
            refused.append((drawn_by + " -> JSON Schema", value))

    ascii_re = _as_generators_read(pattern)
    readings = {"ASCII re": ascii_re, "Unicode re": re.compile(ascii_re.pattern)}
    strategies = {name: st.from_regex(r, alphabet=ALPHABET) for name, r in readings.items()}
    for name, strategy in list(strategies.items()):
        try:
            strategy.validate()
        except InvalidArgument:  # Hypothesis cannot draw it (as schemathesis, it reads the other)
            del strategies[name]
    assert strategies, "no reading of the pattern can be drawn from"

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def draw(data: Any) -> None:
        for name, strategy in strategies.items():
            check(data.draw(strategy), name)

    draw()
    assert refused == [], f"{pattern!r}: values valid to one reading, refused by another"


@pytest.mark.parametrize("space", SPACES, ids=[f"U+{ord(s):04X}" for s in SPACES])
def test_a_username_or_name_of_whitespace_is_refused_by_every_reading(space: str) -> None:
    """The spaces ``\\s`` disagrees on: each reading refuses them where the API does."""
    from relay.api.sources import BasicAuth
    from relay.api.tenants import TenantCreate

    def api_accepts(model: type[pydantic.BaseModel], body: dict[str, Any]) -> bool:
        try:
            model.model_validate(body)
        except pydantic.ValidationError:
            return False
        return True

    username = f"a{space}b"
    props = BasicAuth.model_json_schema()["properties"]["username"]
    by_api = api_accepts(BasicAuth, {"type": "basic", "username": username})
    assert by_api == jsonschema_rs.is_valid(props, username)
    assert by_api == bool(_as_generators_read(props["pattern"]).search(username))

    name_schema = TenantCreate.model_json_schema()["properties"]["name"]
    by_api = api_accepts(TenantCreate, {"name": space})
    assert by_api == jsonschema_rs.is_valid(name_schema, space)
    assert by_api == bool(_as_generators_read(name_schema["pattern"]).search(space))
