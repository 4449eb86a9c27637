"""What a gRPC servicer knows of the served model, as plain data: what GetModelInfo answers and what checks
a client-preprocessed pixel batch. No torch or transformers, so front-end processes (``--frontends``), which
get it from the engine over the link, start without loading them; the engine's own servicer reads the same."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vitcache.errors import ErrorCode, ImageError
from vitcache.inputs import PixelRows
from vitcache.wire.tensor_codec import itemsize

PIXEL_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class MaxPixelsPerFrame:
    """smart_resize (Qwen) keeps h*w*patch² within max_pixels."""

    patch_size: int
    max_pixels: int

    def check(self, height: int, width: int) -> None:
        pixels = height * width * self.patch_size**2
        if pixels > self.max_pixels:
            raise ValueError(f"{pixels} pixels per frame is over the model's max_pixels={self.max_pixels}")


@dataclass(frozen=True)
class NavitFrameLimit:
    """navit_resize (Kimi) keeps each side within max_size_per_side (padded to the merge size), and its flooring
    and padding add at most h + w patches to max_patches, counted without the last merge_size rows and columns
    (padding)."""

    merge_size: int
    max_size_per_side: int
    max_patches: int

    def check(self, height: int, width: int) -> None:
        merge = self.merge_size
        longest = -(-self.max_size_per_side // merge) * merge
        if max(height, width) > longest or (height - merge) * (width - merge) > self.max_patches + height + width:
            raise ValueError(
                f"{height}x{width} patches per frame is over what the model's preprocessing makes "
                f"(max_patches={self.max_patches}, max_size_per_side={self.max_size_per_side})"
            )


FrameLimit = MaxPixelsPerFrame | NavitFrameLimit


@dataclass(frozen=True)
class ServedModel:
    """The served model as GetModelInfo describes it, and the grids and frames it takes."""

    family: str
    model_name: str
    dtype: str
    device: str
    namespace: str
    merge_size: int
    output_names: tuple[str, ...]
    output_hidden_sizes: tuple[int, ...]
    max_frames: int | None  # clips of more frames are refused
    patch_size: int
    temporal_patch_size: int
    patch_dim: int
    preprocess_config_json: str
    frame_limit: FrameLimit  # the largest frame the model's preprocessing makes

    def validate_grid(self, grid_thw: tuple[int, int, int]) -> None:
        if len(grid_thw) != 3 or any(not isinstance(v, int) or v < 1 for v in grid_thw):
            raise ValueError(f"grid_thw must be three integers >= 1, got {grid_thw}")
        t, h, w = grid_thw
        if h % self.merge_size or w % self.merge_size:
            raise ValueError(f"grid {grid_thw}: h and w must be multiples of the merge size {self.merge_size}")
        if self.max_frames is not None and t > self.max_frames:
            raise ValueError(f"grid {grid_thw}: this model embeds at most {self.max_frames} frames per clip")


def validate_pixel_batch(
    model: ServedModel, data: bytes, dtype: str, shape: Sequence[int], grid_flat: Sequence[int]
) -> list[PixelRows | ImageError]:
    """Splits a client-preprocessed batch per image by its grid.

    Raises ImageError for what makes the whole batch unusable (wrong width, dtype,
    a grid that does not add up to the rows); returns a per-image ImageError for an
    image whose own grid the model cannot take.
    """

    def invalid(message: str) -> ImageError:
        return ImageError(ErrorCode.INVALID_ARGUMENT, message)

    if dtype not in PIXEL_DTYPES:
        raise invalid(f"pixel_values dtype must be float32, bfloat16 or float16, got {dtype!r}")
    size = itemsize(dtype)
    patch_dim = model.patch_dim
    if len(shape) != 2 or shape[1] != patch_dim:
        got = list(shape) if len(shape) <= 4 else f"{len(shape)} dimensions"
        raise invalid(f"pixel_values must have shape (patches, {patch_dim}), got {got}")
    if shape[0] * shape[1] * size != len(data):
        raise invalid(f"pixel_values holds {len(data)} bytes, not {list(shape)} of {dtype}")
    if not grid_flat or len(grid_flat) % 3:
        raise invalid(f"image_grid_thw must be N x 3 values, got {len(grid_flat)}")
    grids = [tuple(int(v) for v in grid_flat[i : i + 3]) for i in range(0, len(grid_flat), 3)]
    if any(v <= 0 for grid in grids for v in grid):
        raise invalid("image_grid_thw values must be positive")
    total = sum(t * h * w for t, h, w in grids)
    if total != shape[0]:
        raise invalid(f"image_grid_thw adds up to {total} patches but pixel_values has {shape[0]} rows")
    view, row_bytes, start = memoryview(data), patch_dim * size, 0
    images: list[PixelRows | ImageError] = []
    for grid in grids:
        patches = grid[0] * grid[1] * grid[2]
        end = start + patches * row_bytes
        try:
            model.validate_grid(grid)  # type: ignore[arg-type]
            model.frame_limit.check(grid[1], grid[2])
            images.append(PixelRows(view[start:end], dtype, grid, patch_dim))  # type: ignore[arg-type]
        except ValueError as exc:
            images.append(invalid(f"image_grid_thw {list(grid)}: {exc}"))
        start = end
    return images
