"""The OpenAPI 3.1 document, built from the same route table that registers the routes."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import pydantic
from aiohttp import web

from relay.api.routing import Route

OPENAPI: web.AppKey[dict[str, Any]] = web.AppKey("openapi")
_PARAM = re.compile(r"{(\w+)}")
_REF = "#/components/schemas/{model}"

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
    "400": "Malformed request or JSON",
    "401": "Missing or invalid credentials",
    "404": "Not found (or another tenant's)",
    "415": "Not JSON",
    "422": "Validation error, with details per field",
}


def relay_version() -> str:
    """The installed package's version."""
    try:
        return version("relay")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0.0.0"


def _schema(model: type[pydantic.BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True, ref_template=_REF)
    components.update(schema.pop("$defs", {}))
    components[model.__name__] = schema
    return {"$ref": _REF.format(model=model.__name__)}


def _operation(route: Route, components: dict[str, Any]) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": route.summary,
        "operationId": route.handler.__name__,
        "responses": {str(route.status): {"description": "Success"}},
    }
    params = [
        {"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
        for n in _PARAM.findall(route.path)
    ]
    if route.query is not None:
        for name, field in route.query.model_fields.items():
            params.append(
                {
                    "name": field.alias or name,
                    "in": "query",
                    "required": False,
                    "schema": {"type": "string"},
                }
            )
    if params:
        op["parameters"] = params
    if route.body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _schema(route.body, components)}},
        }
    if route.auth == "operator":
        op["security"] = [{"operatorToken": []}]
    elif route.auth == "tenant":
        op["security"] = [{"tenantKey": []}]
    elif route.auth == "source":
        op["security"] = [{"sourceToken": []}, {"sourceBasic": []}, {}]
    if route.auth != "none":
        for code, text in _ERRORS.items():
            op["responses"].setdefault(
                code,
                {
                    "description": text,
                    "content": {
                        "application/json": {"schema": {"$ref": _REF.format(model="Error")}}
                    },
                },
            )
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
