"""The OpenAPI 3.1 document, built from the same route table that registers the routes."""

from __future__ import annotations

import re
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Literal

import pydantic

from relay.api.responses import ANSWERS, Answer
from relay.api.routing import Route

_PARAM = re.compile(r"{(\w+)}")
_REF = "#/components/schemas/{model}"

#: Strings the API accepts never hold NUL (Postgres text cannot); said in each string's schema.
NO_NUL = r"^[^\x00]*$"

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "details": {},
            },
        }
    },
}
_ERRORS = {
    400: "Malformed request or JSON, or a header, query or form that is not UTF-8 (any path)",
    401: "Missing or invalid credentials",
    404: "Not found (or another tenant's)",
    409: "Conflicts with the resource's state",
    413: "Body too large",
    415: "Not JSON",
    422: "Validation error, with details per field; also a well-formed id that names nothing "
    "of the tenant's (source_ids, target_ids), or a delivery of a deleted target",
    429: "Rate limited; see Retry-After",
    431: "Request line or headers too large (answered before routing, on any path)",
    503: "A dependency is unavailable; try again shortly",
}
_SUCCESS = {200: "OK", 201: "Created", 202: "Accepted", 204: "No content"}
#: ``POST /in/{source_id}``: one event, or a batch of 1..1000 (any JSON objects).
INGEST_BODY = {
    "oneOf": [
        {"type": "object"},
        {"type": "array", "items": {"type": "object"}, "minItems": 1, "maxItems": 1000},
    ]
}


def relay_version() -> str:
    """The installed package's version."""
    try:
        return version("relay")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0.0.0"


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def request_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` saying what a request may hold: no NUL in any string, no ``default: null``.

    A string schema without a pattern, format or fixed values gets ``NO_NUL``;
    ``schema`` is changed in place and returned.
    """
    for node in _walk(schema):
        if "default" in node and node["default"] is None:
            del node["default"]
        if node.get("type") == "string" and not {"pattern", "format", "enum", "const"} & set(node):
            node["pattern"] = NO_NUL
    return schema


def _component(
    model: type[pydantic.BaseModel], components: dict[str, Any], *, request: bool
) -> dict[str, Any]:
    mode: Literal["validation", "serialization"] = "validation" if request else "serialization"
    schema = model.model_json_schema(by_alias=True, ref_template=_REF, mode=mode)
    defs = schema.pop("$defs", {})
    if request:
        request_schema(schema)
        request_schema(defs)
    components.update(defs)
    components[model.__name__] = schema
    return {"$ref": _REF.format(model=model.__name__)}


def _query_parameters(model: type[pydantic.BaseModel]) -> list[dict[str, Any]]:
    schema = model.model_json_schema(by_alias=True, mode="validation")
    params = []
    for name, prop in schema["properties"].items():
        # An absent parameter is None; a present one is never null.
        options = [p for p in prop.get("anyOf", [prop]) if p.get("type") != "null"]
        (value,) = options
        value = {k: v for k, v in value.items() if k != "title"}
        if "default" in prop and prop["default"] is not None:
            value["default"] = prop["default"]
        params.append(
            {
                "name": name,
                "in": "query",
                "required": name in schema.get("required", ()),
                "schema": request_schema(value),
            }
        )
    return params


def _error(code: int) -> dict[str, Any]:
    return {
        "description": _ERRORS[code],
        "content": {"application/json": {"schema": {"$ref": _REF.format(model="Error")}}},
    }


def _success(route: Route, answer: Answer, components: dict[str, Any]) -> dict[str, Any]:
    success: dict[str, Any] = {"description": _SUCCESS.get(route.status, "Success")}
    if route.status == 204:
        return success
    schema: dict[str, Any] = {"type": "object"}
    if answer.media_type is not None:
        success["content"] = {answer.media_type: {"schema": {"type": "string"}}}
        return success
    if answer.model is not None:
        schema = _component(answer.model, components, request=False)
    if answer.page:
        schema = {
            "type": "object",
            "required": ["data", "next_cursor"],
            "properties": {
                "data": {"type": "array", "items": schema},
                "next_cursor": {"type": ["string", "null"]},
            },
        }
    success["content"] = {"application/json": {"schema": schema}}
    return success


def _operation(route: Route, components: dict[str, Any]) -> dict[str, Any]:
    answer = ANSWERS[(route.method, route.path)]  # every route declares its answer
    op: dict[str, Any] = {
        "summary": route.summary,
        "operationId": route.handler.__name__,
        "responses": {str(route.status): _success(route, answer, components)},
    }
    path_params = _PARAM.findall(route.path)
    params = [
        {
            "name": n,
            "in": "path",
            "required": True,
            "schema": {"type": "string", "minLength": 1, "pattern": NO_NUL},
        }
        for n in path_params
    ]
    if route.query is not None:
        params.extend(_query_parameters(route.query))
    if params:
        op["parameters"] = params
    if route.body is not None:
        op["requestBody"] = {
            "required": not route.body_optional,
            "content": {
                "application/json": {"schema": _component(route.body, components, request=True)}
            },
        }
    if route.auth == "source":
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": INGEST_BODY}},
        }
    # the server refuses an oversized request line or headers before any route runs, and
    # the edge (relay/web/edge.py) a header or query that is not UTF-8
    errors: set[int] = set(answer.errors) | {400, 431}
    if route.auth == "operator":
        op["security"] = [{"operatorToken": []}]
    elif route.auth == "tenant":
        op["security"] = [{"tenantKey": []}]
    elif route.auth == "source":
        op["security"] = [{"sourceToken": []}, {"sourceBasic": []}, {}]
    if route.auth != "none":
        # 429: an address that failed too many credentials (relay/core/auth_throttle.py)
        errors |= {401, 429, 503}
    if path_params:
        errors.add(404)
    if route.body is not None:
        errors |= {400, 413, 415, 422}
    if route.query is not None:
        errors.add(422)
    for code in sorted(errors):
        op["responses"][str(code)] = _error(code)
    return op


def build_openapi(routes: list[Route]) -> dict[str, Any]:
    """The document for ``routes``."""
    components: dict[str, Any] = {"Error": ERROR_SCHEMA}
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, components)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Relay",
            "version": relay_version(),
            "description": "Multi-tenant webhook relay: ingest, fan-out, signed delivery.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "operatorToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "RELAY_ADMIN_TOKEN",
                },
                "tenantKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A tenant API key",
                },
                "sourceToken": {"type": "apiKey", "in": "query", "name": "token"},
                "sourceBasic": {"type": "http", "scheme": "basic"},
            },
        },
    }
