"""What the engine is asked for: the forms an image arrives in, and who asks until when."""

from __future__ import annotations

import time
from dataclasses import dataclass

from vitcache.errors import ErrorCode, ImageError

#: What a Put may store: a key of at most this many UTF-8 bytes, 1 to MAX_PUT_TENSORS tensors of PUT_DTYPES.
MAX_PUT_KEY_BYTES = 256
MAX_PUT_TENSORS = 8
PUT_DTYPES = ("float32", "bfloat16", "float16")


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


@dataclass(frozen=True)
class VideoSampling:
    """What a request chooses of a video's preprocessing; part of its digest, so the same file at 1 fps
    and at 2 fps are two entries. Unset fields take the model's video processor's values;
    ``min_pixels``/``max_pixels`` are its ``size`` bounds as it reads them (Qwen3-VL: over all frames)."""

    fps: float | None = None
    num_frames: int | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None

    def check(self) -> None:
        """Raises ImageError INVALID_ARGUMENT for settings no processor takes."""
        problem = ""
        if self.fps is not None and self.num_frames is not None:
            problem = "set fps or num_frames, not both"
        elif self.fps is not None and not 0 < self.fps <= 1000:
            problem = f"fps must be in (0, 1000], got {self.fps}"
        elif any(v is not None and v < 1 for v in (self.num_frames, self.min_pixels, self.max_pixels)):
            problem = "num_frames, min_pixels and max_pixels must be positive"
        elif None not in (self.min_pixels, self.max_pixels) and self.min_pixels > self.max_pixels:  # type: ignore[operator]
            problem = "min_pixels is over max_pixels"
        if problem:
            raise ImageError(ErrorCode.INVALID_ARGUMENT, f"video sampling: {problem}")

    def header(self) -> str:
        """Canonical text of the settings, hashed into the digest (``float.hex``: exact, one spelling)."""
        fps = "" if self.fps is None else float(self.fps).hex()
        values = (self.num_frames, self.min_pixels, self.max_pixels)
        return f"fps={fps};frames={{}};min={{}};max={{}}".format(*("" if v is None else v for v in values))


@dataclass(frozen=True)
class EncodedVideo:
    """A video file (MP4, WebM, MKV, ...), decoded and sampled on the server."""

    data: bytes
    sampling: VideoSampling = VideoSampling()


@dataclass(frozen=True)
class RawVideo:
    """Frames the caller decoded and sampled: uint8 (T, H, W, 3) RGB and the second each is shown at."""

    rgb: bytes
    frames: int
    height: int
    width: int
    timestamps: tuple[float, ...]
    sampling: VideoSampling = VideoSampling()  # only min/max_pixels apply: the frames are sampled already


ImageInput = EncodedFile | RawRGB | PixelRows | DigestOnly | EncodedVideo | RawVideo


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
Computable = EncodedFile | RawRGB | PixelRows | EncodedVideo | RawVideo
