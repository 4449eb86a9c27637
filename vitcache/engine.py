"""The cache service without a transport: digest, look up L1 then L2, compute only misses.

The gRPC server is a thin layer over :class:`EmbeddingEngine`; anything that embeds
vitcache in-process (an inference server's own encoder path) can use it directly.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from vitcache.batcher import Batcher
from vitcache.digest import DIGEST_SIZE, digest_file, digest_pixels, digest_rgb
from vitcache.entry import CachedEmbedding
from vitcache.errors import ErrorCode, ImageError
from vitcache.models import VisionEncoder
from vitcache.preprocess import DecodeLimits, ImageRejected, decode_image, preprocess, raw_image
from vitcache.tensor_codec import dtype_from_name, tensor_from_buffer
from vitcache.tiers import L1Cache, RedisTier

log = logging.getLogger(__name__)


class Source(enum.IntEnum):
    """Where an image's embedding came from; values match the wire enum."""

    L1 = 1
    L2 = 2
    COMPUTED = 3


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
class ImageOutcome:
    index: int
    digest: bytes
    entry: CachedEmbedding | None = None
    source: Source | None = None
    error: ImageError | None = None


@dataclass(frozen=True)
class EngineConfig:
    max_batch_patches: int = 16384
    max_batch_wait_s: float = 0.002
    preprocess_workers: int = 4
    limits: DecodeLimits = field(default_factory=DecodeLimits)


@dataclass
class EngineStats:
    l1_hits: int = 0
    l2_hits: int = 0
    misses: int = 0
    not_found: int = 0
    errors: int = 0
    single_flight_joins: int = 0
    started_at: float = field(default_factory=time.monotonic)


class EmbeddingEngine:
    """Serves per-image embeddings from L1, L2 or one shared computation.

    Invariants:
    - At most one resolution (L2 lookup, then preprocessing and a forward) runs per digest
      at a time; concurrent requests for it wait on that one (single flight).
    - A computed entry is in L1 before anyone is answered; the L2 write follows in the
      background (``drain`` waits for outstanding writes).
    - Every input image ends in exactly one :class:`ImageOutcome`; a failure of one image
      never fails another.
    """

    def __init__(
        self, encoder: VisionEncoder, l1: L1Cache, l2: RedisTier | None = None, config: EngineConfig | None = None
    ) -> None:
        self.encoder = encoder
        self.l1 = l1
        self.l2 = l2
        self.config = config or EngineConfig()
        self.stats = EngineStats()
        self.batcher = Batcher(encoder, self.config.max_batch_patches, self.config.max_batch_wait_s)
        self._preprocess_pool = ThreadPoolExecutor(self.config.preprocess_workers, "vitcache-preprocess")
        self._inflight: dict[bytes, asyncio.Task[tuple[CachedEmbedding, Source]]] = {}
        self._l2_writes: set[asyncio.Task[bool]] = set()

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.stats.started_at

    async def start(self) -> None:
        self.batcher.start()
        if self.l2 is not None:
            await self.l2.ping()

    async def stop(self) -> None:
        await self.drain()
        await self.batcher.stop()
        self._preprocess_pool.shutdown(wait=True)
        if self.l2 is not None:
            await self.l2.close()

    async def drain(self) -> None:
        """Waits until every computed entry has been offered to L2."""
        while self._l2_writes:
            await asyncio.gather(*list(self._l2_writes), return_exceptions=True)

    async def encode(self, images: Sequence[ImageInput | ImageError]) -> AsyncIterator[ImageOutcome]:
        """Yields one outcome per image, in completion order.

        An :class:`ImageError` in ``images`` stands for an input the caller already found
        invalid; it comes back as that image's outcome.
        """
        tasks = [asyncio.ensure_future(self._serve(i, image)) for i, image in enumerate(images)]
        try:
            for next_done in asyncio.as_completed(tasks):
                yield await next_done
        finally:
            for task in tasks:
                task.cancel()

    async def fetch(self, digests: Sequence[bytes]) -> AsyncIterator[ImageOutcome]:
        async for outcome in self.encode([DigestOnly(d) for d in digests]):
            yield outcome

    async def _serve(self, index: int, image: ImageInput | ImageError) -> ImageOutcome:
        digest = b""
        try:
            if isinstance(image, ImageError):
                raise image
            digest = self._digest(image)
            entry = self.l1.get(digest)
            if entry is not None:
                self.stats.l1_hits += 1
                return ImageOutcome(index, digest, entry, Source.L1)
            if isinstance(image, DigestOnly):
                entry = await self._from_l2(digest)
                if entry is None:
                    self.stats.not_found += 1
                    raise ImageError(ErrorCode.NOT_FOUND, f"digest {digest.hex()} is not cached; send the image")
                self.stats.l2_hits += 1
                return ImageOutcome(index, digest, entry, Source.L2)
            entry, source = await self._resolve_once(digest, image)
            return ImageOutcome(index, digest, entry, source)
        except ImageError as exc:
            if exc.code is not ErrorCode.NOT_FOUND:
                self.stats.errors += 1
            return ImageOutcome(index, digest, error=exc)

    def _digest(self, image: ImageInput) -> bytes:
        if isinstance(image, DigestOnly):
            if len(image.digest) != DIGEST_SIZE:
                raise ImageError(
                    ErrorCode.INVALID_ARGUMENT, f"digest must be {DIGEST_SIZE} bytes, got {len(image.digest)}"
                )
            return image.digest
        if isinstance(image, EncodedFile):
            if len(image.data) > self.config.limits.max_image_bytes:
                raise ImageError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"image of {len(image.data)} bytes is over the limit of {self.config.limits.max_image_bytes}",
                )
            return digest_file(image.data)
        if isinstance(image, RawRGB):
            return digest_rgb(image.rgb, image.height, image.width)
        return digest_pixels(image.data, image.grid_thw, image.dtype, image.row_width)

    async def _from_l2(self, digest: bytes) -> CachedEmbedding | None:
        if self.l2 is None:
            return None
        entry = await self.l2.get(digest)
        if entry is not None:
            self.l1.put(digest, entry)
        return entry

    async def _resolve_once(self, digest: bytes, image: ImageInput) -> tuple[CachedEmbedding, Source]:
        task = self._inflight.get(digest)
        if task is None:
            task = asyncio.ensure_future(self._resolve(digest, image))
            self._inflight[digest] = task
            task.add_done_callback(lambda _: self._inflight.pop(digest, None))
        else:
            self.stats.single_flight_joins += 1
        # shield: a cancelled request must not cancel the computation others wait on.
        entry, source = await asyncio.shield(task)
        if source is Source.L2:
            self.stats.l2_hits += 1
        else:
            self.stats.misses += 1
        return entry, source

    async def _resolve(self, digest: bytes, image: ImageInput) -> tuple[CachedEmbedding, Source]:
        entry = await self._from_l2(digest)
        if entry is not None:
            return entry, Source.L2
        loop = asyncio.get_running_loop()
        pixel_values, grid = await loop.run_in_executor(self._preprocess_pool, self._prepare, image)
        entry = await self.batcher.encode(pixel_values, grid)
        self.l1.put(digest, entry)
        if self.l2 is not None:
            write = asyncio.ensure_future(self.l2.put(digest, entry))
            self._l2_writes.add(write)
            write.add_done_callback(self._l2_writes.discard)
        return entry, Source.COMPUTED

    def _prepare(self, image: ImageInput) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Decode and preprocess on the encoder's device (preprocessing thread)."""
        limits, encoder = self.config.limits, self.encoder
        try:
            if isinstance(image, PixelRows):
                return self._pixel_rows(image), image.grid_thw
            if isinstance(image, EncodedFile):
                pixels = decode_image(image.data, limits)
            else:
                assert isinstance(image, RawRGB)
                pixels = raw_image(image.rgb, image.height, image.width, limits)
            pixel_values, grid = preprocess(pixels, encoder.preprocess_config, encoder.device)
        except ImageRejected as exc:
            raise ImageError(ErrorCode.INVALID_ARGUMENT, str(exc)) from exc
        return pixel_values, grid

    def _pixel_rows(self, image: PixelRows) -> torch.Tensor:
        t, h, w = image.grid_thw
        rows = tensor_from_buffer(image.data, image.dtype, (t * h * w, image.row_width))
        return rows.to(self.encoder.device)

    def validate_pixel_batch(
        self, data: bytes, dtype: str, shape: Sequence[int], grid_flat: Sequence[int]
    ) -> list[PixelRows | ImageError]:
        """Splits a client-preprocessed batch per image by its grid.

        Raises ImageError for what makes the whole batch unusable (wrong width, dtype,
        a grid that does not add up to the rows); returns a per-image ImageError for an
        image whose own grid the model cannot take.
        """

        def invalid(message: str) -> ImageError:
            return ImageError(ErrorCode.INVALID_ARGUMENT, message)

        if dtype not in ("float32", "bfloat16", "float16"):
            raise invalid(f"pixel_values dtype must be float32, bfloat16 or float16, got {dtype!r}")
        itemsize = torch.empty((), dtype=dtype_from_name(dtype)).element_size()
        patch_dim = self.encoder.preprocess_config.patch_dim
        if len(shape) != 2 or shape[1] != patch_dim:
            raise invalid(f"pixel_values must have shape (patches, {patch_dim}), got {list(shape)}")
        if shape[0] * shape[1] * itemsize != len(data):
            raise invalid(f"pixel_values holds {len(data)} bytes, not {list(shape)} of {dtype}")
        if not grid_flat or len(grid_flat) % 3:
            raise invalid(f"image_grid_thw must be N x 3 values, got {len(grid_flat)}")
        grids = [tuple(int(v) for v in grid_flat[i : i + 3]) for i in range(0, len(grid_flat), 3)]
        if any(v <= 0 for grid in grids for v in grid):
            raise invalid("image_grid_thw values must be positive")
        total = sum(t * h * w for t, h, w in grids)
        if total != shape[0]:
            raise invalid(f"image_grid_thw adds up to {total} patches but pixel_values has {shape[0]} rows")
        max_patches = self.config.limits.max_image_pixels // self.encoder.preprocess_config.patch_size**2
        view, row_bytes, start = memoryview(data), patch_dim * itemsize, 0
        images: list[PixelRows | ImageError] = []
        for grid in grids:
            patches = grid[0] * grid[1] * grid[2]
            end = start + patches * row_bytes
            try:
                self.encoder.validate_grid(grid)  # type: ignore[arg-type]
                if patches > max_patches:
                    raise ValueError(f"{patches} patches is over the limit of {max_patches}")
                images.append(PixelRows(view[start:end], dtype, grid, patch_dim))  # type: ignore[arg-type]
            except ValueError as exc:
                images.append(invalid(f"image_grid_thw {list(grid)}: {exc}"))
            start = end
        return images
