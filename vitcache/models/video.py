"""Video preprocessing of the Qwen families: frame sampling, the model's own video processor, and the
timing fields (Qwen2.5-VL's ``second_per_grid_ts``, Qwen3-VL's per-group timestamps) a caller needs
to place the tokens.

The pixel math is transformers' video processor of the family (loaded from the checkpoint, run on the
encoder's device), so cached features equal ``processor(videos=...)`` + ``get_video_features``
by construction. Its full config is hashed into the model namespace; what a request may choose
(:class:`~vitcache.inputs.VideoSampling`) is hashed into the video's digest.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers.video_processing_utils import BaseVideoProcessor
from transformers.video_utils import VideoMetadata

from vitcache.errors import ImageRejected
from vitcache.inputs import VideoSampling
from vitcache.models.family import ModelFamily
from vitcache.wire.timing import VideoTiming

#: transformers' frame rate for frames whose rate is unknown (a single raw frame).
DEFAULT_FPS = 24.0


def load_video_processor(checkpoint_dir: str | Path, family: ModelFamily) -> BaseVideoProcessor | None:
    """The family's transformers video processor as the checkpoint configures it (None: no video path).

    A checkpoint leaving ``cap_pixels_per_frame`` unset gets transformers' current behaviour (False),
    set explicitly so the namespace and the warning-free call agree.
    """
    if family.video_processor_cls is None:
        return None
    processor = family.video_processor_cls.from_pretrained(str(checkpoint_dir))
    if processor.cap_pixels_per_frame is None:
        processor.cap_pixels_per_frame = False
    return processor


def processor_json(processor: BaseVideoProcessor | None) -> str:
    """The processor's full config, canonical, for the namespace ("" without a video path)."""
    return "" if processor is None else processor.to_json_string()


def sample_indices(processor: BaseVideoProcessor, total: int, fps: float, sampling: VideoSampling) -> list[int]:
    """The frames (indices into ``total`` at ``fps``) that transformers' processor samples.

    Sampling runs when the request sets ``fps`` or ``num_frames``, or the processor samples by default
    (``do_sample_frames``, Qwen3-VL at 2 fps); otherwise every frame is kept, as transformers does.
    """
    if sampling.fps is None and sampling.num_frames is None and not processor.do_sample_frames:
        return list(range(total))
    metadata = VideoMetadata(total_num_frames=total, fps=fps)
    try:
        indices = processor.sample_frames(metadata, num_frames=sampling.num_frames, fps=sampling.fps)
    except (ValueError, ZeroDivisionError) as e:
        raise ImageRejected(f"cannot sample the video ({total} frames at {fps:g} fps): {e}") from e
    indices = [int(i) for i in np.asarray(indices).reshape(-1)]
    if not indices or min(indices) < 0 or max(indices) >= total:
        raise ImageRejected(f"sampling {sampling} leaves no frame of the video's {total}")
    return indices


def preprocess_video(
    frames: np.ndarray | torch.Tensor,
    processor: BaseVideoProcessor,
    sampling: VideoSampling,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Sampled (T, H, W, 3) uint8 RGB frames to (pixel_values_videos on ``device``, (t, h, w))."""
    pixels = torch.from_dlpack(frames) if isinstance(frames, np.ndarray) else frames
    if pixels.dtype != torch.uint8 or pixels.ndim != 4 or pixels.shape[3] != 3:
        raise ValueError(f"expected (T, H, W, 3) uint8 frames, got {tuple(pixels.shape)} {pixels.dtype}")
    size = dict(processor.size)
    if sampling.min_pixels is not None:
        size["shortest_edge"] = sampling.min_pixels
    if sampling.max_pixels is not None:
        size["longest_edge"] = sampling.max_pixels
    try:
        out = processor(
            videos=[pixels.to(device).permute(0, 3, 1, 2)],
            do_sample_frames=False,
            size={"shortest_edge": size["shortest_edge"], "longest_edge": size["longest_edge"]},
            device=str(device),
            return_tensors="pt",
        )
    except ValueError as e:  # an aspect ratio over 200, too few frames for Qwen3-VL's resize
        raise ImageRejected(f"the model's video processor refuses the video: {e}") from e
    t, h, w = (int(v) for v in out["video_grid_thw"][0])
    return out["pixel_values_videos"], (t, h, w)


def timing(frame_seconds: Sequence[float], temporal_patch_size: int) -> VideoTiming:
    """The timing fields of sampled frames shown at ``frame_seconds`` (ascending), as transformers'
    Qwen2.5-VL and Qwen3-VL processors derive them from the sampled indices and the video's rate."""
    frames = len(frame_seconds)
    span = frame_seconds[-1] - frame_seconds[0]
    sampled_fps = (frames - 1) / span if frames > 1 and span > 0 else DEFAULT_FPS
    padded = list(frame_seconds) + [frame_seconds[-1]] * (-frames % temporal_patch_size)
    groups = range(0, len(padded), temporal_patch_size)
    stamps = tuple((padded[i] + padded[i + temporal_patch_size - 1]) / 2 for i in groups)
    return VideoTiming(frames, sampled_fps, temporal_patch_size / sampled_fps, stamps)


def file_timing(indices: Sequence[int], total: int, fps: float, temporal_patch_size: int) -> VideoTiming:
    """:func:`timing` of frames sampled from a file; the rate is transformers' ``sampled_fps``
    (frames kept / frames in the file x the file's rate), not the spacing of the kept frames."""
    sampled = timing([i / fps for i in indices], temporal_patch_size)
    sampled_fps = len(indices) / total * fps
    return VideoTiming(sampled.frames, sampled_fps, temporal_patch_size / sampled_fps, sampled.timestamps)
