"""Per-image errors of the library, independent of any transport.

The server maps :class:`ErrorCode` to gRPC status codes in one place
(``vitcache.server.status``); the values equal grpc.StatusCode's numbers so clients of
the wire format read them as such.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    INTERNAL = 13
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16


class ImageError(Exception):
    """One image could not be served; the other images of the request are unaffected."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __reduce__(self) -> tuple[type[ImageError], tuple[ErrorCode, str]]:
        return ImageError, (self.code, self.message)  # picklable: it crosses to and from the encoder process

    def __repr__(self) -> str:
        return f"ImageError({self.code.name}, {self.message!r})"


class ImageRejected(ValueError):
    """An input image is unusable; str(e) is the message sent to the user (INVALID_ARGUMENT)."""


class ConfigError(Exception):
    """A setting an operator gave cannot work (a model that does not load, a malformed URL, ...).

    Its message says what is wrong and what to do, in a line: ``vitcache`` prints it instead of a
    traceback (``--log-level debug`` shows the traceback too).
    """
