"""The one place where library errors become gRPC status codes."""

from __future__ import annotations

import grpc

from vitcache.errors import ErrorCode

_STATUS = {code: grpc.StatusCode[code.name] for code in ErrorCode}


def status_code(code: ErrorCode) -> grpc.StatusCode:
    return _STATUS[code]


def wire_code(code: ErrorCode) -> int:
    """The integer carried in ImageResult.error_code (grpc.StatusCode's own number)."""
    return _STATUS[code].value[0]
