"""The device side of a video miss: probe, sample, decode, preprocess, then the batched forward.

A video takes its sampled frames' pixels from the pipeline's decoded pixel budget before any frame
is decoded (from the container's header, or the raw frames' geometry) and gives them back once its
``pixel_values_videos`` are made, as an image does. A frame counts as the larger of its own width x
height and the processor's ``min_pixels``, which small frames are scaled up to: a clip of 2x2 frames
must not buy a gigabyte of resized frames for a few bytes of budget.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import torch
from av.codec.hwaccel import HWAccel

from vitcache.cache.entry import CachedEmbedding
from vitcache.encode.batch import Batcher
from vitcache.encode.budget import PixelBudget
from vitcache.encode.video_decode import (
    VideoHeader,
    VideoLimits,
    check_frame_count,
    check_frame_size,
    decode_frames,
    probe_video,
)
from vitcache.errors import ErrorCode, ImageError, ImageRejected
from vitcache.inputs import EncodedVideo, RawVideo, Scope, VideoSampling
from vitcache.models import accel
from vitcache.models.loading import VisionEncoder
from vitcache.models.video import file_timing, preprocess_video, sample_indices, timing
from vitcache.wire.timing import VideoTiming


@dataclass(frozen=True)
class _Plan:
    """What a video will be decoded into, known before decoding: its budget share and its timing."""

    pixels: int
    timing: VideoTiming
    header: VideoHeader | None = None  # files only
    indices: tuple[int, ...] = ()  # files only


class VideoPipeline:
    """Computes one video's entry with the image pipeline's budget, threads and batcher.

    Raises :class:`ImageError` for the video alone: INVALID_ARGUMENT for a file that is not a
    decodable video, is damaged or truncated, or is over a :class:`VideoLimits` bound; for a model
    without a video path; RESOURCE_EXHAUSTED for one over the whole decoded pixel budget.
    """

    def __init__(
        self,
        encoder: VisionEncoder,
        limits: VideoLimits,
        hwaccel: HWAccel | None,
        budget: PixelBudget,
        give_back: Callable[[int, asyncio.Future[object]], None],
        pool: ThreadPoolExecutor,
        batcher: Batcher,
    ) -> None:
        self.encoder = encoder
        self.limits = limits
        self.hwaccel = hwaccel  # NVDEC for files, or None: software (video_hwaccel)
        self.budget = budget
        self.give_back = give_back  # returns a video's pixels to ``budget`` once it is preprocessed
        self.pool = pool
        self.batcher = batcher

    async def compute(self, video: EncodedVideo | RawVideo, scope: Scope) -> CachedEmbedding:
        if self.encoder.video_processor is None:
            raise ImageError(ErrorCode.INVALID_ARGUMENT, f"this model ({self.encoder.family}) has no video path")
        video.sampling.check()
        loop = asyncio.get_running_loop()
        try:
            plan = await loop.run_in_executor(None, self._plan, video)
        except ImageRejected as exc:
            raise ImageError(ErrorCode.INVALID_ARGUMENT, str(exc)) from exc
        await self.budget.take(plan.pixels, scope.deadline)
        preparing = loop.run_in_executor(self.pool, self._prepare, video, plan, scope)
        preparing.add_done_callback(lambda done: self.give_back(plan.pixels, done))
        pixel_values, grid = await asyncio.shield(preparing)
        entry = await self.batcher.submit(pixel_values, grid, scope.deadline)
        return replace(entry, video=plan.timing)

    def _plan(self, video: EncodedVideo | RawVideo) -> _Plan:
        """The frames to decode and their timing, from the header alone (a worker thread: probing a
        container without a frame count reads its packet index)."""
        temporal = self.encoder.preprocess_config.temporal_patch_size
        if isinstance(video, RawVideo):
            return self._raw_plan(video, temporal)
        header = probe_video(video.data, self.limits)
        indices = sample_indices(self.encoder.video_processor, header.frames, header.fps, video.sampling)
        check_frame_count(len(indices), self.limits)
        pixels = len(indices) * self._frame_pixels(header.height, header.width, video.sampling)
        return _Plan(pixels, file_timing(indices, header.frames, header.fps, temporal), header, tuple(indices))

    def _frame_pixels(self, height: int, width: int, sampling: VideoSampling) -> int:
        """What one frame takes of the budget: its pixels, or the ``min_pixels`` it is scaled up to.
        Raises ImageRejected for pixel bounds over ``max_video_frame_pixels``."""
        bound = self.limits.max_video_frame_pixels
        if max(sampling.min_pixels or 0, sampling.max_pixels or 0) > bound:
            raise ImageRejected(f"min_pixels and max_pixels may be at most {bound} (--max-video-frame-pixels)")
        min_pixels = sampling.min_pixels or self.encoder.video_processor.size["shortest_edge"]
        return max(height * width, min_pixels)

    def _raw_plan(self, video: RawVideo, temporal: int) -> _Plan:
        if video.sampling.fps is not None or video.sampling.num_frames is not None:
            raise ImageRejected("raw frames are sampled already: fps and num_frames do not apply to them")
        if video.frames < 1:
            raise ImageRejected("a raw video needs at least one frame")
        check_frame_count(video.frames, self.limits)
        check_frame_size(video.height, video.width, self.limits)
        if len(video.rgb) != video.frames * video.height * video.width * 3:
            raise ImageRejected(
                f"raw video of {video.frames}x{video.height}x{video.width} RGB frames needs "
                f"{video.frames * video.height * video.width * 3} bytes, got {len(video.rgb)}"
            )
        seconds = video.timestamps
        if len(seconds) != video.frames:
            raise ImageRejected(f"{len(seconds)} timestamps for {video.frames} frames: give one per frame")
        if not all(math.isfinite(s) for s in seconds) or any(b < a for a, b in itertools.pairwise(seconds)):
            raise ImageRejected("frame timestamps must be finite seconds in ascending order")
        pixels = video.frames * self._frame_pixels(video.height, video.width, video.sampling)
        return _Plan(pixels, timing(seconds, temporal))

    def _prepare(
        self, video: EncodedVideo | RawVideo, plan: _Plan, scope: Scope
    ) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Decode and preprocess on the encoder's device (preprocessing thread)."""
        scope.check_deadline()  # it may have waited for a preprocessing thread
        encoder = self.encoder
        try:
            if isinstance(video, EncodedVideo):
                assert plan.header is not None
                frames = decode_frames(video.data, plan.header, list(plan.indices), scope.check_deadline, self.hwaccel)
            else:
                shape = (video.frames, video.height, video.width, 3)
                frames = np.frombuffer(video.rgb, np.uint8).reshape(shape)
            with accel.side_stream(encoder.device):
                return preprocess_video(frames, encoder.video_processor, video.sampling, encoder.device)
        except ImageRejected as exc:
            raise ImageError(ErrorCode.INVALID_ARGUMENT, str(exc)) from exc
