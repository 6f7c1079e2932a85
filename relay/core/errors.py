"""The one error tree of the API, rendered into API.md's error shape by one middleware.

Each class's docstring is its default message.
"""

from __future__ import annotations

from typing import Any


class RelayError(Exception):
    """Something went wrong."""

    status: int = 500
    code: str = "internal_error"

    def __init__(
        self,
        message: str | None = None,
        *,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.message = message or (type(self).__doc__ or "error").strip().splitlines()[0]
        self.details = details
        self.headers = headers or {}
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        """The JSON body API.md prescribes."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            error["details"] = self.details
        return {"error": error}


class InvalidRequest(RelayError):
    """The request is malformed."""

    status, code = 400, "invalid_request"


class InvalidJSON(RelayError):
    """The body is not valid JSON."""

    status, code = 400, "invalid_json"


class Unauthorized(RelayError):
    """Missing or invalid credentials."""

    status, code = 401, "unauthorized"


class NotFound(RelayError):
    """No such resource."""

    status, code = 404, "not_found"


class MethodNotAllowed(RelayError):
    """This method is not allowed on this path."""

    status, code = 405, "method_not_allowed"


class Conflict(RelayError):
    """The request conflicts with the current state."""

    status, code = 409, "conflict"


class PayloadTooLarge(RelayError):
    """The body is larger than allowed."""

    status, code = 413, "payload_too_large"


class UnsupportedMediaType(RelayError):
    """The body must be JSON (content-type: application/json)."""

    status, code = 415, "unsupported_media_type"


class ValidationFailed(RelayError):
    """Some fields are invalid."""

    status, code = 422, "validation_error"

    @classmethod
    def field(cls, name: str, message: str) -> ValidationFailed:
        """One bad field."""
        return cls(f"{name}: {message}", details=[{"field": name, "message": message}])


class RateLimited(RelayError):
    """Too many requests."""

    status, code = 429, "rate_limited"

    def __init__(self, retry_after: int, message: str | None = None) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, retry_after))})


class Unavailable(RelayError):
    """A dependency is unavailable; try again shortly."""

    status, code = 503, "unavailable"
    #: Seconds a client should wait before trying again (the Retry-After header).
    RETRY_AFTER_S = 2

    def __init__(self, message: str | None = None, *, details: Any = None) -> None:
        super().__init__(message, details=details, headers={"Retry-After": str(self.RETRY_AFTER_S)})
