"""The one place where library errors become gRPC status codes (and, on the metrics port, HTTP statuses)."""

from __future__ import annotations

import grpc

from vitcache.errors import ErrorCode

_STATUS = {code: grpc.StatusCode[code.name] for code in ErrorCode}


def status_code(code: ErrorCode) -> grpc.StatusCode:
    return _STATUS[code]


def wire_code(code: ErrorCode) -> int:
    """The integer carried in ImageResult.error_code (grpc.StatusCode's own number)."""
    return _STATUS[code].value[0]


#: The metrics port's answer to a refused request (the gRPC-to-HTTP mapping of google.rpc.Code).
_HTTP_STATUS = {
    ErrorCode.UNAUTHENTICATED: "401 Unauthorized",
    ErrorCode.PERMISSION_DENIED: "403 Forbidden",
}


def http_status(code: ErrorCode) -> str:
    return _HTTP_STATUS[code]
