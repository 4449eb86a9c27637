"""Image files to pixels on the encoder's device: format checks and size limits before any pixel is
allocated, nvJPEG for baseline JPEGs on CUDA, Pillow for the rest, batched across requests."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers.image_transforms import convert_to_rgb

from vitcache.config import LimitsConfig
from vitcache.encode.batch import deliver, gather_batch
from vitcache.errors import ImageRejected
from vitcache.models import accel

log = logging.getLogger(__name__)

# Raster formats accepted from the network. Pillow can open many more (EPS and PDF-like ones run external
# programs such as Ghostscript), which is attack surface no VLM request needs.
DECODE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG includes multi-picture (MPO) files


@dataclass(frozen=True)
class DecodeLimits:
    """The decoder's share of :class:`~vitcache.config.LimitsConfig`."""

    max_image_bytes: int = LimitsConfig.max_image_bytes
    max_image_pixels: int = LimitsConfig.max_image_pixels


def _check_size(height: int, width: int, limits: DecodeLimits) -> None:
    if height <= 0 or width <= 0:
        raise ImageRejected(f"image has zero size ({width}x{height})")
    if height * width > limits.max_image_pixels:
        raise ImageRejected(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {limits.max_image_pixels}"
        )


@contextlib.contextmanager
def _opened(data: bytes, limits: DecodeLimits) -> Iterator[Image.Image]:
    """The image with only its header read and checked against ``limits``; whatever Pillow raises
    in the block becomes ImageRejected.

    Pillow reads only the header in `Image.open`, so the limits are enforced before any pixel
    buffer is allocated.
    """
    if not data:
        raise ImageRejected("image is empty")
    if len(data) > limits.max_image_bytes:
        raise ImageRejected(f"image is {len(data)} bytes, over the limit of {limits.max_image_bytes}")
    image_format = "image"  # its format once Pillow has recognised one
    try:
        with Image.open(io.BytesIO(data), formats=DECODE_FORMATS) as image:
            image_format = f"{image.format} image"
            _check_size(image.height, image.width, limits)
            yield image
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageRejected(f"image has too many pixels: {e}") from e
    except UnidentifiedImageError as e:  # its message is a repr of the in-memory file
        raise ImageRejected(f"not a decodable image: its bytes are none of {', '.join(DECODE_FORMATS)}") from e
    # Pillow's format plugins raise many exception types on malformed input (OSError, SyntaxError,
    # ValueError, struct.error, EOFError, ...): every one of them means the upload is unusable.
    except Exception as e:
        raise ImageRejected(f"not a decodable {image_format}: {e}") from e


def decode_image(data: bytes, limits: DecodeLimits) -> np.ndarray:
    """Decode an encoded image to (H, W, 3) uint8 RGB, refusing oversized inputs before decoding them.

    Modes are converted with transformers' `convert_to_rgb` (transparency composited onto white),
    and no EXIF transpose is applied, both exactly as HF's image processors do.
    """
    with _opened(data, limits) as image:
        image.load()
        return convert_to_rgb(image, return_numpy=True)


def image_pixels(data: bytes, limits: DecodeLimits) -> int:
    """width x height of an encoded image from its header alone, so its decoded size is known (and
    budgeted) before decoding; raises ImageRejected for what `decode_image` refuses before decoding."""
    with _opened(data, limits) as image:
        return image.height * image.width


def _nvjpeg_eligible(data: bytes, limits: DecodeLimits) -> bool:
    """A baseline RGB/grayscale JPEG within the limits (checked from its header; raises ImageRejected)."""
    if data[:2] != b"\xff\xd8" or len(data) > limits.max_image_bytes:
        return False
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as header:
            _check_size(header.height, header.width, limits)
            return header.mode in ("RGB", "L")  # CMYK and the like keep Pillow's conversion
    except ImageRejected:
        raise
    except Exception:
        return False  # Pillow's full decode below gives the user the real error


def decode_images_on(
    files: list[bytes], limits: DecodeLimits, device: torch.device | str
) -> list[torch.Tensor | ImageRejected]:
    """Like `decode_image` for many files, each an (H, W, 3) uint8 tensor on `device`, or its rejection.

    On CUDA with torchvision, baseline JPEGs decode in one batched nvJPEG call (Huffman decoding on
    the GPU too); anything nvJPEG refuses, and every other format, goes through Pillow, so the accepted
    inputs and their limits are the same on every device.
    """
    device = torch.device(device)
    results: list[torch.Tensor | ImageRejected | None] = [None] * len(files)
    on_gpu: list[int] = []
    if device.type == "cuda":
        try:
            from torchvision.io import ImageReadMode, decode_jpeg
        except ImportError:
            decode_jpeg = None
        for i, data in enumerate(files):
            try:
                if decode_jpeg is not None and _nvjpeg_eligible(data, limits):
                    on_gpu.append(i)
            except ImageRejected as e:
                results[i] = e
        if on_gpu:
            encoded = [torch.frombuffer(bytearray(files[i]), dtype=torch.uint8) for i in on_gpu]
            try:
                decoded = decode_jpeg(encoded, ImageReadMode.RGB, device=device)
            except RuntimeError:  # one file nvJPEG cannot take (progressive, arithmetic-coded): one by one
                decoded = []
                for data in encoded:
                    try:
                        decoded.append(decode_jpeg(data, ImageReadMode.RGB, device=device))
                    except RuntimeError:
                        decoded.append(None)
            for i, chw in zip(on_gpu, decoded, strict=True):
                results[i] = None if chw is None else chw.permute(1, 2, 0)
    for i, data in enumerate(files):
        if results[i] is None:
            try:
                results[i] = torch.from_numpy(decode_image(data, limits)).to(device)
            except ImageRejected as e:
                results[i] = e
    return results  # type: ignore[return-value]


def decode_image_on(data: bytes, limits: DecodeLimits, device: torch.device | str) -> torch.Tensor:
    """`decode_images_on` for one file; raises ImageRejected."""
    (result,) = decode_images_on([data], limits, device)
    if isinstance(result, ImageRejected):
        raise result
    return result


def raw_image(rgb: bytes, height: int, width: int, limits: DecodeLimits) -> np.ndarray:
    """View packed RGB bytes as an (H, W, 3) uint8 image without copying."""
    _check_size(height, width, limits)
    if len(rgb) != height * width * 3:
        raise ImageRejected(f"raw RGB image of {width}x{height} needs {height * width * 3} bytes, got {len(rgb)}")
    return np.frombuffer(rgb, dtype=np.uint8).reshape(height, width, 3)


class DecodeBatcher:
    """Decodes the encoded files of concurrent requests together on the encoder's device.

    One batched nvJPEG call decodes a whole batch with Huffman decoding on the GPU too, about
    3x faster than file by file (bench/miss_path.py). Same FIFO/budget/wait rules as the forward
    batcher; the decode runs on the preprocessing threads.
    """

    def __init__(
        self, limits: DecodeLimits, device: torch.device, pool: ThreadPoolExecutor, max_files: int = 64
    ) -> None:
        self.limits = limits
        self.device = device
        self.max_files = max_files
        self._pool = pool
        self._queue: deque[tuple[bytes, asyncio.Future[torch.Tensor]]] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="vitcache-decoder")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def decode(self, data: bytes) -> torch.Tensor:
        """(H, W, 3) uint8 on the device; raises ImageRejected."""
        future: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        self._queue.append((data, future))
        self._wakeup.set()
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await gather_batch(self._queue, self._wakeup, self.max_files, lambda _: 1, 0.0005)
            batch = [(data, future) for data, future in batch if not future.done()]
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._pool, self._decode, [data for data, _ in batch])
            except Exception as exc:  # a bug, not bad input: fail this batch, keep serving
                log.exception("decode failed")
                results = [exc] * len(batch)
            deliver([future for _, future in batch], results)

    def _decode(self, files: list[bytes]) -> list[torch.Tensor | ImageRejected]:
        with accel.side_stream(self.device):
            return decode_images_on(files, self.limits, self.device)
