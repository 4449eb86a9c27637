"""What the engine is asked for: the forms an image arrives in, and who asks until when."""

from __future__ import annotations

import time
from dataclasses import dataclass

from vitcache.errors import ErrorCode, ImageError


@dataclass(frozen=True)
class EncodedFile:
    data: bytes


@dataclass(frozen=True)
class RawRGB:
    rgb: bytes
    height: int
    width: int


@dataclass(frozen=True)
class PixelRows:
    """One image's rows of a client-preprocessed ``pixel_values`` batch."""

    data: bytes | memoryview
    dtype: str
    grid_thw: tuple[int, int, int]
    row_width: int


@dataclass(frozen=True)
class DigestOnly:
    digest: bytes


ImageInput = EncodedFile | RawRGB | PixelRows | DigestOnly


@dataclass(frozen=True)
class Scope:
    """Who asks and until when: the tenant scopes every cache key; past the deadline
    (``time.monotonic()``) an image that has not reached the device is dropped."""

    tenant: str = ""
    deadline: float | None = None

    def check_deadline(self) -> None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise ImageError(ErrorCode.DEADLINE_EXCEEDED, "deadline passed while queued")


#: What needs the device: everything but a digest.
Computable = EncodedFile | RawRGB | PixelRows
