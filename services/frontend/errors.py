"""OpenAI-shaped API errors: the exception the frontend raises and the body it turns into.

Owns the error type names, HTTP statuses and the `{"error": {...}}` encoding. Does not decide
when a request is wrong; `protocol` and `app` do that.
"""

from __future__ import annotations

from typing import Final

import msgspec

INVALID_REQUEST = "invalid_request_error"
NOT_FOUND = "not_found_error"
SERVICE_UNAVAILABLE = "service_unavailable"
INTERNAL = "internal_error"

_TYPE_BY_STATUS = {400: INVALID_REQUEST, 404: NOT_FOUND, 503: SERVICE_UNAVAILABLE}


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(msgspec.Struct):
    error: ErrorDetail


class ApiError(Exception):
    """A request that ends in an OpenAI error response; `reason` labels the rejection metric."""

    def __init__(self, status: int, message: str, *, type: str | None = None,
                 param: str | None = None, code: str | None = None,
                 reason: str = "invalid",
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or error_type(status)
        self.param = param
        self.code = code
        self.reason = reason
        self.headers = headers or []  # extra response headers (Retry-After, x-ratelimit-*)

    def body(self) -> bytes:
        return msgspec.json.encode(ErrorBody(ErrorDetail(self.message, self.type, self.param,
                                                         self.code)))


def error_type(status: int) -> str:
    if status in _TYPE_BY_STATUS:
        return _TYPE_BY_STATUS[status]
    return INVALID_REQUEST if 400 <= status < 500 else INTERNAL


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def unsupported(param: str, what: str | None = None) -> ApiError:
    """A field the spec allows but Turnout does not implement."""
    detail = f": {what}" if what else ""
    return ApiError(400, f"Unsupported parameter '{param}'{detail}", param=param,
                    code="unsupported_parameter", reason="unsupported")


# vLLM's guided decoding fields, removed there in favour of `structured_outputs` (vLLM now
# ignores them, output unconstrained): the field of `structured_outputs` each became.
_GUIDED: Final = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                  "guided_grammar": "grammar"}


def unknown_field(param: str) -> ApiError:
    hint = ""
    if param in _GUIDED:
        hint = (f" ({param} was vLLM's, removed in favour of structured_outputs: send "
                f"\"structured_outputs\": {{\"{_GUIDED[param]}\": ...}})")
    return ApiError(400, f"Unrecognized request argument supplied: {param}{hint}", param=param,
                    code="unknown_parameter", reason="unknown_field")
