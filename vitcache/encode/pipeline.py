"""The device side of a miss: decode, preprocess and the batched vision forward.

:class:`EncodePipeline` runs them in this process; ``vitcache.encode.encoder_process.EncoderProcess``
runs one in a child process and answers through the same methods, so the engine does not
care which it has.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import torch

from vitcache.cache.entry import CachedEmbedding
from vitcache.config import BatchingConfig, LimitsConfig
from vitcache.encode.batch import Batcher, Materialize
from vitcache.encode.budget import PixelBudget
from vitcache.encode.decode import DecodeBatcher, DecodeLimits, decode_image_on, image_pixels, raw_image
from vitcache.encode.video_decode import VideoLimits, video_hwaccel
from vitcache.encode.video_pipeline import VideoPipeline
from vitcache.errors import ErrorCode, ImageError, ImageRejected
from vitcache.inputs import Computable, EncodedFile, EncodedVideo, PixelRows, RawRGB, RawVideo, Scope
from vitcache.models import accel
from vitcache.models.loading import EncoderSpec, VisionEncoder
from vitcache.models.preprocess import preprocess
from vitcache.observer import EngineObserver
from vitcache.stats import BatcherStats, EncoderStatus
from vitcache.wire.tensor_codec import tensor_from_buffer


@dataclass(frozen=True)
class PipelineConfig:
    """How misses are prepared and packed into forwards; picklable, for an encoder process."""

    batching: BatchingConfig = field(default_factory=BatchingConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)


class EncodePipeline:
    """Turns an image into its :class:`CachedEmbedding` on the encoder's device.

    Encoded files from concurrent calls are decoded together (batched nvJPEG on CUDA),
    preprocessed on ``preprocess_workers`` threads and packed into forwards by a
    :class:`Batcher`. Decoding waits for room in a :class:`PixelBudget` shared by all
    calls. Raises :class:`ImageError` for the image alone.
    """

    def __init__(
        self,
        encoder: VisionEncoder,
        config: PipelineConfig,
        observer: EngineObserver | None = None,
        materialize: Materialize = CachedEmbedding.from_tensors,
    ) -> None:
        self.encoder = encoder
        self.spec: EncoderSpec = encoder.spec
        batching, limits = config.batching, config.limits
        hwaccel = video_hwaccel(limits.video_decoder, encoder.device)  # first: it may refuse the config
        self.limits = DecodeLimits(limits.max_image_bytes, limits.max_image_pixels)
        self.budget = PixelBudget(limits.max_decoded_pixels_in_flight)
        self.observer = observer or EngineObserver()
        self.batcher = Batcher(
            encoder, batching.max_batch_patches, batching.max_batch_wait_s, self.observer, materialize
        )
        self._pool = ThreadPoolExecutor(batching.preprocess_workers, "vitcache-preprocess")
        self.decoder = DecodeBatcher(self.limits, encoder.device, self._pool) if encoder.device.type == "cuda" else None
        video_limits = VideoLimits(
            limits.max_video_bytes, limits.max_video_seconds, limits.max_video_frames, limits.max_video_frame_pixels
        )
        self.videos = VideoPipeline(
            encoder, video_limits, hwaccel, self.budget, self._give_back, self._pool, self.batcher
        )

    @property
    def stats(self) -> BatcherStats:
        self.batcher.stats.decoded_pixels_peak = self.budget.peak
        return self.batcher.stats

    def device_memory(self) -> dict[str, int]:
        """Allocated and reserved bytes of the encoder's CUDA device; empty on the CPU."""
        device = self.encoder.device
        if device.type != "cuda":
            return {}
        return {"allocated": torch.cuda.memory_allocated(device), "reserved": torch.cuda.memory_reserved(device)}

    def encoders(self) -> list[EncoderStatus]:
        return [EncoderStatus(self.spec.device, True, self.stats, self.device_memory())]

    async def start(self) -> None:
        self.batcher.start()
        if self.decoder is not None:
            self.decoder.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        if self.decoder is not None:
            await self.decoder.stop()
        self._pool.shutdown(wait=True)

    async def compute(self, image: Computable, scope: Scope) -> CachedEmbedding:
        scope.check_deadline()
        if isinstance(image, EncodedVideo | RawVideo):
            return await self.videos.compute(image, scope)
        with self.observer.timed("preprocess"):
            pixels = await self._decoded_pixels(image)
            await self.budget.take(pixels, scope.deadline)
            # Preprocessed, only the (model-sized) pixel values are left: the pixels are given back then.
            # Shielded, so a cancelled call gives them back when its decode thread is done, not before.
            preparing = asyncio.ensure_future(self._preprocess(image, scope))
            preparing.add_done_callback(lambda done: self._give_back(pixels, done))
            pixel_values, grid = await asyncio.shield(preparing)
        return await self.batcher.submit(pixel_values, grid, scope.deadline)

    async def _preprocess(self, image: Computable, scope: Scope) -> tuple[torch.Tensor, tuple[int, int, int]]:
        decoded = await self._decode_on_device(image)
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._prepare, image, scope, decoded)

    def _give_back(self, pixels: int, preprocessed: asyncio.Future[object]) -> None:
        self.budget.give_back(pixels)
        if not preprocessed.cancelled():
            preprocessed.exception()  # retrieved: the caller that would have may be gone

    async def _decoded_pixels(self, image: Computable) -> int:
        """What ``image`` takes of the decoded pixel budget: its width x height (client-preprocessed
        rows take none); raises INVALID_ARGUMENT for an image over the per-image limits."""
        try:
            if isinstance(image, EncodedFile):
                # Off the event loop: a header can be megabytes of chunks to skip.
                return await asyncio.get_running_loop().run_in_executor(None, image_pixels, image.data, self.limits)
            if isinstance(image, RawRGB):
                raw_image(image.rgb, image.height, image.width, self.limits)  # checks size and length; no copy
                return image.height * image.width
            return 0
        except ImageRejected as exc:
            raise ImageError(ErrorCode.INVALID_ARGUMENT, str(exc)) from exc

    async def _decode_on_device(self, image: Computable) -> torch.Tensor | None:
        if self.decoder is None or not isinstance(image, EncodedFile):
            return None
        try:
            return await self.decoder.decode(image.data)
        except ImageRejected as exc:
            raise ImageError(ErrorCode.INVALID_ARGUMENT, str(exc)) from exc

    def _prepare(
        self, image: Computable, scope: Scope, decoded: torch.Tensor | None
    ) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Decode (unless ``decoded``) and preprocess on the encoder's device (preprocessing thread)."""
        scope.check_deadline()  # it may have waited for a preprocessing thread
        encoder = self.encoder
        try:
            with accel.side_stream(encoder.device):
                if isinstance(image, PixelRows):
                    return self._pixel_rows(image), image.grid_thw
                if decoded is not None:
                    pixels = decoded
                elif isinstance(image, EncodedFile):
                    pixels = decode_image_on(image.data, self.limits, encoder.device)
                else:
                    assert isinstance(image, RawRGB)
                    pixels = raw_image(image.rgb, image.height, image.width, self.limits)
                return preprocess(pixels, encoder.preprocess_config, encoder.device)
        except ImageRejected as exc:
            raise ImageError(ErrorCode.INVALID_ARGUMENT, str(exc)) from exc

    def _pixel_rows(self, image: PixelRows) -> torch.Tensor:
        """The image's rows on the device; raises ImageRejected for NaN or infinite values, which
        would come out as an all-NaN embedding. One reduction on the device, waited for on this
        thread's side stream, so the image never joins a batch."""
        t, h, w = image.grid_thw
        rows = tensor_from_buffer(image.data, image.dtype, (t * h * w, image.row_width))
        rows = rows.to(self.encoder.device)
        if not torch.isfinite(rows).all():
            raise ImageRejected(f"pixel_values of the image of image_grid_thw {[t, h, w]} hold NaN or infinite values")
        return rows


class Pipeline(Protocol):
    """What the engine needs of a device side: :class:`EncodePipeline`, an ``EncoderProcess`` or an ``EncoderPool``."""

    spec: EncoderSpec

    @property
    def stats(self) -> BatcherStats: ...

    def encoders(self) -> list[EncoderStatus]:
        """Per device: one for a single encoder, one per device for a pool."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def compute(self, image: Computable, scope: Scope) -> CachedEmbedding: ...
