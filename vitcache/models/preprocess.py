"""The HF image processors' preprocessing in plain torch.

Preprocessing runs on the encoder's device, so it is written with torch ops that reproduce what
transformers' torchvision-backed processors compute. The resize/pad/normalize/patchify math here is
shared; how a family's processor reads its settings and sizes an image is its
:class:`PreprocessConfig` subclass (in vitcache/models/<family>.py), with the target sizes taken
from transformers' own functions (`smart_resize`, `navit_resize`, ...).
"""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_utils import PILImageResampling

from vitcache.models.served import FrameLimit

# Processor settings this module implements; a checkpoint asking for anything else is refused, not approximated.
SUPPORTED_FLAGS = {"do_resize": True, "do_rescale": True, "do_normalize": True, "resample": PILImageResampling.BICUBIC}

# The first families' configs all hashed these four (null where unused) into the cache namespace: kept in every
# config's JSON so the namespaces of existing caches stay the same.
_NAMESPACE_V1_SIZE_KEYS = dict.fromkeys(("min_pixels", "max_pixels", "max_patches", "max_size_per_side"))


@dataclass(frozen=True)
class PreprocessConfig(ABC):
    """Everything that changes pixel_values; hashed into the cache namespace. Abstract: each family's
    subclass adds its size limits and says how its processor sizes an image."""

    kind: ClassVar[str]  # names the processor in the namespace JSON
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    rescale_factor: float

    @classmethod
    @abstractmethod
    def from_pretrained(cls, checkpoint_dir: str | Path) -> PreprocessConfig:
        """Resolve preprocessor_config.json with HF's own precedence rules and defaults."""

    @abstractmethod
    def target_size(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(resized, padded) (height, width) of an image, exactly as the family's HF processor picks them;
        raises ImageRejected for an image it refuses."""

    @property
    @abstractmethod
    def frame_limit(self) -> FrameLimit:
        """The largest frame (in patches) ``preprocess`` makes: pixel batches come preprocessed by the client,
        and are held to the bound decoded images get."""

    def check_frame(self, height: int, width: int) -> None:
        """Raises ValueError for a frame of ``height`` x ``width`` patches larger than ``preprocess`` makes."""
        self.frame_limit.check(height, width)

    @property
    def patch_group(self) -> int:
        """Patches are laid out in groups of patch_group x patch_group (the tower merges each group)."""
        return self.merge_size

    def to_json(self) -> str:
        return json.dumps({**_NAMESPACE_V1_SIZE_KEYS, "kind": self.kind, **dataclasses.asdict(self)}, sort_keys=True)

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size**2


def check_supported(settings: dict[str, Any], checkpoint_dir: str | Path) -> None:
    """Refuses a processor that flips any of SUPPORTED_FLAGS (``settings`` holds the processor's values of them)."""
    if settings != SUPPORTED_FLAGS:
        raise ValueError(f"unsupported image processor settings in {checkpoint_dir}: {settings}")


def image_grid(height: int, width: int, config: PreprocessConfig) -> tuple[int, int, int]:
    """The (t, h, w) patch grid ``preprocess`` gives an image of ``height`` x ``width``."""
    _, (padded_h, padded_w) = config.target_size(height, width)
    return 1, padded_h // config.patch_size, padded_w // config.patch_size


def preprocess(
    image: np.ndarray | torch.Tensor, config: PreprocessConfig, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """One (H, W, 3) uint8 RGB image to (pixel_values (t*h*w, patch_dim) float32 on `device`, (t, h, w)).

    Mirrors the torchvision processors step by step: bicubic antialiased resize computed in float then
    clamped and rounded back to uint8 values (torchvision's path for uint8 on GPU), zero padding (Kimi) before
    normalization, the fused rescale+normalize, and HF's patch ordering.
    """
    # DLPack shares the read-only views `raw_image` returns without torch's non-writable-array warning.
    pixels = torch.from_dlpack(image) if isinstance(image, np.ndarray) else image
    if pixels.dtype != torch.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {tuple(pixels.shape)} {pixels.dtype}")
    height, width = pixels.shape[:2]
    (resized_h, resized_w), (padded_h, padded_w) = config.target_size(height, width)

    x = pixels.to(device).permute(2, 0, 1).unsqueeze(0).float()
    if (resized_h, resized_w) != (height, width):  # torchvision returns the image untouched at the same size
        x = F.interpolate(x, size=(resized_h, resized_w), mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp_(0, 255).round_()
    x = F.pad(x, (0, padded_w - resized_w, 0, padded_h - resized_h))
    mean = torch.tensor(config.image_mean, device=x.device) * (1.0 / config.rescale_factor)
    std = torch.tensor(config.image_std, device=x.device) * (1.0 / config.rescale_factor)
    x = x.sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))

    # Qwen groups patches merge_size x merge_size and repeats the frame temporal_patch_size times; Kimi's
    # raster order is the same layout with groups of one patch and no temporal repeat.
    patch = config.patch_size
    group = config.patch_group
    grid_h, grid_w = padded_h // patch, padded_w // patch
    x = x.reshape(3, grid_h // group, group, patch, grid_w // group, group, patch)
    x = x.permute(1, 4, 2, 5, 0, 3, 6).unsqueeze(5)
    x = x.expand(-1, -1, -1, -1, -1, config.temporal_patch_size, -1, -1)
    return x.reshape(grid_h * grid_w, config.patch_dim), (1, grid_h, grid_w)
