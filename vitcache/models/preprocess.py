"""The HF image processors' preprocessing in plain torch.

Preprocessing runs on the encoder's device, so it is written with torch ops that reproduce what
transformers' torchvision-backed processors (`Qwen2VLImageProcessor`, `Kimi_K25ImageProcessor`)
compute, while the target sizes come from transformers' own `smart_resize` / `navit_resize`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Qwen2VLImageProcessorPil
from transformers.image_processing_utils import ImageProcessingMixin
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, PILImageResampling

# The torchvision-backed module re-exports the same function but cannot be imported without torchvision.
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from vitcache.errors import ImageRejected

PREPROCESS_KINDS = ("qwen2_vl", "kimi_k25")

# `Kimi_K25ImageProcessor`'s class defaults, used where preprocessor_config.json leaves a value out. Restated
# because that class's module imports torchvision; tests check them against it where torchvision exists.
KIMI_DEFAULTS = {
    "patch_size": 14,
    "merge_size": 2,
    "max_patches": 16384,
    "size": {"max_height": 512, "max_width": 512},
    "image_mean": IMAGENET_STANDARD_MEAN,
    "image_std": IMAGENET_STANDARD_STD,
    "rescale_factor": 1 / 255,
}

# Processor settings this module implements; a checkpoint asking for anything else is refused, not approximated.
_SUPPORTED_FLAGS = {"do_resize": True, "do_rescale": True, "do_normalize": True, "resample": PILImageResampling.BICUBIC}


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything that changes pixel_values; hashed into the cache namespace."""

    kind: str
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    min_pixels: int | None
    max_pixels: int | None
    max_patches: int | None
    max_size_per_side: int | None
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    rescale_factor: float

    def __post_init__(self) -> None:
        required = {
            "qwen2_vl": (self.min_pixels, self.max_pixels),
            "kimi_k25": (self.max_patches, self.max_size_per_side),
        }
        if self.kind not in required:
            raise ValueError(f"unknown preprocessing kind {self.kind!r}, expected one of {PREPROCESS_KINDS}")
        if any(value is None for value in required[self.kind]):
            raise ValueError(f"incomplete {self.kind} preprocessing config: {self}")

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path, kind: str) -> PreprocessConfig:
        """Resolve preprocessor_config.json with HF's own precedence rules and defaults."""
        if kind == "qwen2_vl":
            # The PIL processor class shares the torchvision one's config handling (size vs min/max_pixels).
            processor = Qwen2VLImageProcessorPil.from_pretrained(str(checkpoint_dir))
            settings = {name: getattr(processor, name) for name in _SUPPORTED_FLAGS}
            config = cls(
                kind=kind,
                patch_size=processor.patch_size,
                temporal_patch_size=processor.temporal_patch_size,
                merge_size=processor.merge_size,
                min_pixels=processor.size["shortest_edge"],
                max_pixels=processor.size["longest_edge"],
                max_patches=None,
                max_size_per_side=None,
                image_mean=tuple(processor.image_mean),
                image_std=tuple(processor.image_std),
                rescale_factor=processor.rescale_factor,
            )
        elif kind == "kimi_k25":
            saved, _ = ImageProcessingMixin.get_image_processor_dict(str(checkpoint_dir))
            values = {**KIMI_DEFAULTS, **_SUPPORTED_FLAGS, **saved}
            settings = {name: values[name] for name in _SUPPORTED_FLAGS}
            if values["size"].get("max_width") != values["size"]["max_height"]:  # HF refuses it too
                raise ValueError(f"Kimi's size must have equal max_height and max_width, got {values['size']}")
            config = cls(
                kind=kind,
                patch_size=values["patch_size"],
                temporal_patch_size=1,  # Kimi embeds each frame on its own and pools frames after the tower
                merge_size=values["merge_size"],
                min_pixels=None,
                max_pixels=None,
                max_patches=values["max_patches"],
                max_size_per_side=values["size"]["max_height"],
                image_mean=tuple(values["image_mean"]),
                image_std=tuple(values["image_std"]),
                rescale_factor=values["rescale_factor"],
            )
        else:
            raise ValueError(f"unknown preprocessing kind {kind!r}, expected one of {PREPROCESS_KINDS}")
        if settings != _SUPPORTED_FLAGS:
            raise ValueError(f"unsupported image processor settings in {checkpoint_dir}: {settings}")
        return config

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size**2

    def check_frame(self, height: int, width: int) -> None:
        """Raises ValueError for a frame of ``height`` x ``width`` patches larger than ``preprocess`` makes.

        Pixel batches come preprocessed by the client; this holds them to the bound decoded images get.
        Qwen's smart_resize keeps h*w*patch² within max_pixels. Kimi's navit_resize keeps each side within
        max_size_per_side (padded to the merge size), and its flooring and padding add at most h + w
        patches to max_patches, counted without the last merge_size rows and columns (padding).
        """
        if self.kind == "qwen2_vl":
            assert self.max_pixels is not None
            pixels = height * width * self.patch_size**2
            if pixels > self.max_pixels:
                raise ValueError(f"{pixels} pixels per frame is over the model's max_pixels={self.max_pixels}")
            return
        assert self.max_patches is not None and self.max_size_per_side is not None
        merge = self.merge_size
        longest = -(-self.max_size_per_side // merge) * merge
        if max(height, width) > longest or (height - merge) * (width - merge) > self.max_patches + height + width:
            raise ValueError(
                f"{height}x{width} patches per frame is over what the model's preprocessing makes "
                f"(max_patches={self.max_patches}, max_size_per_side={self.max_size_per_side})"
            )


def _target_size(height: int, width: int, config: PreprocessConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """(resized, padded) (height, width) exactly as the HF processor of `config.kind` picks them."""
    if config.kind == "qwen2_vl":
        try:
            resized = smart_resize(
                height,
                width,
                factor=config.patch_size * config.merge_size,
                min_pixels=config.min_pixels,
                max_pixels=config.max_pixels,
            )
        except ValueError as e:  # aspect ratio over 200
            raise ImageRejected(str(e)) from e
        return resized, resized
    try:
        from transformers.models.kimi_k25.image_processing_kimi_k25 import navit_resize
    except ImportError as e:
        raise RuntimeError(
            "Kimi-K2.5 preprocessing needs torchvision: transformers' navit_resize lives in a module importing it"
        ) from e
    return navit_resize(
        height,
        width,
        patch_size=config.patch_size,
        merge_kernel_size=config.merge_size,
        max_patches=config.max_patches,
        max_size_per_side=config.max_size_per_side,
    )


def image_grid(height: int, width: int, config: PreprocessConfig) -> tuple[int, int, int]:
    """The (t, h, w) patch grid ``preprocess`` gives an image of ``height`` x ``width``."""
    _, (padded_h, padded_w) = _target_size(height, width, config)
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
    (resized_h, resized_w), (padded_h, padded_w) = _target_size(height, width, config)

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
    group = config.merge_size if config.kind == "qwen2_vl" else 1
    grid_h, grid_w = padded_h // patch, padded_w // patch
    x = x.reshape(3, grid_h // group, group, patch, grid_w // group, group, patch)
    x = x.permute(1, 4, 2, 5, 0, 3, 6).unsqueeze(5)
    x = x.expand(-1, -1, -1, -1, -1, config.temporal_patch_size, -1, -1)
    return x.reshape(grid_h * grid_w, config.patch_dim), (1, grid_h, grid_w)
