"""The CUDA fast path of the vision towers, around transformers' own modules.

transformers' vision attention without flash-attn splits the packed batch and loops in Python
over every image or window, and recomputes grid-derived metadata (positions, cu_seqlens, window
permutation, with a device sync per layer for ``max_seqlen``). Here:

- attention is one ``torch.nn.attention.varlen.varlen_attn`` call per layer over the packed
  batch, registered as a transformers attention implementation (its name contains "flash" so
  the towers hand it ``cu_seqlens``);
- the grid-derived metadata is computed once per batch on the CPU, with transformers' own
  helpers (``transformers.vision_utils``, called by each family's ``grid_metadata``), and passed
  in, so a forward has no host syncs;
- optionally each block is ``torch.compile``d (one graph shared by all blocks, dynamic length).

The transformers forward with SDPA stays the reference and the fallback (CPU, other devices).
"""

from __future__ import annotations

import functools
import itertools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.vision_utils import get_vision_interpolation_indices_and_weights

if TYPE_CHECKING:
    from vitcache.models.family import ModelFamily

VARLEN_ATTENTION = "flash_varlen_vitcache"


def varlen_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: (1, heads, tokens, dim) in, (1, tokens, heads, dim) out."""
    from torch.nn.attention.varlen import varlen_attn

    q, k, v = (x.squeeze(0).transpose(0, 1) for x in (query, key, value))
    out = varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, scale=scaling)
    return out.unsqueeze(0), None


AttentionInterface.register(VARLEN_ATTENTION, varlen_attention)


def varlen_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def max_len(cu_seqlens: torch.Tensor) -> int:
    """The longest sequence that ``cu_seqlens`` bounds (attention's ``max_seqlen``)."""
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


#: Metadata tensors with one row per patch, which a batch stacks image after image.
_PER_PATCH = ("position_ids", "interp_indices", "interp_weights")


def joined_metadata(family: ModelFamily, tower: nn.Module, grids: list[tuple[int, int, int]]) -> dict[str, Any]:
    """``family.grid_metadata`` of a batch, as its images' (each computed once per grid and cached: batches
    repeat resolutions) joined with offsets, which costs far less than the helpers' loops.

    For families whose metadata is per image: per-patch rows, ``cu_*`` boundaries in patches, ints that are
    maxima over images, and a ``window_index`` over merged tokens.
    """
    parts = [_image_metadata(family, tower, tuple(grid)) for grid in grids]
    merge_unit = tower.config.spatial_merge_size**2
    meta: dict[str, Any] = {}
    for name, first in parts[0].items():
        values = [part[name] for part in parts]
        if isinstance(first, int):
            meta[name] = max(values)
        elif name in _PER_PATCH:
            meta[name] = torch.cat(values)
        else:
            offsets = itertools.accumulate((t * h * w for t, h, w in grids[:-1]), initial=0)
            if name == "window_index":  # indexes merged tokens
                meta[name] = torch.cat([v + offset // merge_unit for v, offset in zip(values, offsets, strict=True)])
            else:  # cu_*: boundaries in patches, each image's starting at 0
                shifted = [v[1:] + offset for v, offset in zip(values, offsets, strict=True)]
                meta[name] = torch.cat([first[:1], *shifted])
    return meta


@functools.lru_cache(maxsize=4096)
def _image_metadata(family: ModelFamily, tower: nn.Module, grid: tuple[int, int, int]) -> dict[str, Any]:
    return family.grid_metadata(tower, torch.tensor([grid], dtype=torch.int64))


def interpolation_metadata(tower: nn.Module, grid: torch.Tensor, **options: int) -> dict[str, torch.Tensor]:
    """The indices and weights that resample a tower's learned position table to each image (none if it has none)."""
    interpolated = next((m for m in tower.modules() if hasattr(m, "num_grid_per_side")), None)
    if interpolated is None:
        return {}
    indices, weights = get_vision_interpolation_indices_and_weights(
        grid,
        interpolated.num_grid_per_side,
        mode=interpolated.interpolation_mode,
        align_corners=interpolated.interpolation_align_corners,
        **options,
    )
    return {"interp_indices": indices, "interp_weights": weights}


def to_device(meta: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: host_to_device(v, device) if torch.is_tensor(v) else v for k, v in meta.items()}


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copies without waiting for the device: CUDA syncs the stream before a copy from pageable memory,
    which would stall the launch of the next batch until the previous forward has finished."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


class PatchLinear(nn.Module):
    """A patch-embedding convolution whose kernel covers its whole input, run as one matmul.

    The towers feed Conv3d/Conv2d one patch per batch row with kernel == stride == the patch, so
    the convolution is a linear map of the flattened patch; cuDNN's convolution is far slower
    than the GEMM. Shares the convolution's parameters (no copy, same state dict).
    """

    def __init__(self, conv: nn.Conv2d | nn.Conv3d) -> None:
        super().__init__()
        self.weight = conv.weight
        self.bias = conv.bias
        self._trailing = (1,) * (conv.weight.dim() - 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.linear(x.flatten(1), self.weight.flatten(1), self.bias)
        return out.view(x.shape[0], -1, *self._trailing)


def linear_patch_embed(tower: nn.Module) -> None:
    conv = tower.patch_embed.proj
    if tuple(conv.kernel_size) != tuple(conv.stride) or any(conv.padding) or conv.groups != 1:
        return  # not a pure per-patch projection: keep the convolution
    tower.patch_embed.proj = PatchLinear(conv)


# (inputs, output) projections of the towers' MLPs, by attribute name.
_MLP_PROJECTIONS = ((("gate_proj", "up_proj"), "down_proj"), (("fc1",), "fc2"), (("linear_fc1",), "linear_fc2"))


def pad_mlp_width(tower: nn.Module, multiple: int = 64) -> None:
    """Zero-pads each MLP's hidden width to a multiple of ``multiple``, exactly.

    Qwen2.5-VL's 3420-wide MLP is not a multiple of 8, so its GEMMs miss cuBLAS's Hopper
    kernels and fall back to slow generic ones (most of a forward's GPU time, bench/miss_path.py).
    Extra input rows are zero (with zero bias), every activation these towers use maps 0 to 0,
    and the extra output columns are zero: the result is unchanged.
    """
    for mlp in tower.modules():
        for inputs, output in _MLP_PROJECTIONS:
            if not all(isinstance(getattr(mlp, name, None), nn.Linear) for name in (*inputs, output)):
                continue
            width = getattr(mlp, output).in_features
            padded = -(-width // multiple) * multiple
            if padded == width:
                continue
            for name in inputs:
                setattr(mlp, name, _resized(getattr(mlp, name), out_features=padded))
            setattr(mlp, output, _resized(getattr(mlp, output), in_features=padded))


def _resized(linear: nn.Linear, in_features: int | None = None, out_features: int | None = None) -> nn.Linear:
    """A copy of ``linear`` with zero rows/columns appended."""
    w = linear.weight
    new = nn.Linear(
        in_features or linear.in_features,
        out_features or linear.out_features,
        bias=linear.bias is not None,
        device=w.device,
        dtype=w.dtype,
    )
    with torch.no_grad():
        new.weight.zero_()
        new.weight[: w.shape[0], : w.shape[1]] = w
        if linear.bias is not None:
            new.bias.zero_()
            new.bias[: linear.bias.shape[0]] = linear.bias
    return new.requires_grad_(False)


_thread_streams = threading.local()


@contextmanager
def side_stream(device: torch.device) -> Iterator[None]:
    """Runs the block on this thread's own CUDA stream and waits for it at the end.

    Preprocessing threads use it so their kernels neither queue behind the running forward on
    the default stream nor make it wait; the results are complete when the block returns. The
    stream has high priority: its few small kernels go ahead of the forward's, so an image's
    preprocessing does not wait out a forward.
    """
    if device.type != "cuda":
        yield
        return
    stream = getattr(_thread_streams, "stream", None)
    if stream is None:
        stream = _thread_streams.stream = torch.cuda.Stream(device, priority=-1)
    with torch.cuda.stream(stream):
        yield
    stream.synchronize()


def compile_blocks(tower: nn.Module) -> None:
    """Compiles each transformer block in place; all blocks share one graph (modules are inputs)."""
    blocks = getattr(tower, "blocks", None) or tower.layers
    for block in blocks:
        block.compile(dynamic=True)
