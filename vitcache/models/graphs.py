"""CUDA graphs of the vision forward: one replay instead of hundreds of kernel launches.

Launching a compiled 32-block forward from Python costs tens of milliseconds of CPU, as much
as the forward itself takes on an H100/H200 at serving batch sizes; in a busy process it is
the bottleneck (bench/miss_path.py, the ``launch`` stage). A captured graph replays all of it
at the cost of one call.

Graphs need fixed shapes, so a batch is padded to a *bucket*:

- its patches to the next multiple of ``patch_step``, the padding being one extra *filler*
  image, as near square as the padding allows (so it adds few attention windows), that attends
  only to itself and whose tokens are dropped (none when the batch fills its bucket: batches of
  448x448 images, 1024 patches each, always do);
- each ``cu_*`` boundary tensor to the next power of two in length, by repeating its last
  value (empty sequences, which attention skips);
- each ``max_*`` length to the next power of two (an upper bound, as attention allows).

Everything else the forward takes is sized by the padded patch count. A bucket's graph is
captured the first time a batch needs it (a warm-up run, then the capture), and all graphs
share one memory pool: they run one at a time on the launching thread's stream, and a
replay's outputs are copied off on that stream before the next replay is queued.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from vitcache.models.family import ModelFamily

log = logging.getLogger(__name__)

#: (pixels, grid_thw on the device, metadata) -> the tower's outputs, one row per token.
TowerRun = Callable[[torch.Tensor, torch.Tensor, dict[str, Any]], list[torch.Tensor]]


def _next_power_of_two(value: int) -> int:
    return 1 << max(0, value - 1).bit_length()


@dataclass(frozen=True)
class PaddedBatch:
    """A batch's metadata padded to its bucket; ``key`` names the bucket (one graph each)."""

    patches: int  # the real patches, then the filler image's if any
    tensors: dict[str, torch.Tensor]  # on the CPU
    ints: dict[str, int]
    key: tuple


def pad_batch(
    family: ModelFamily, tower: nn.Module, merge_size: int, grids: list[tuple[int, int, int]], patch_step: int
) -> PaddedBatch:
    """The metadata of ``grids`` plus a filler image, padded to fixed shapes (see the module doc)."""
    patches = sum(t * h * w for t, h, w in grids)
    bucket = -(-patches // patch_step) * patch_step
    units = (bucket - patches) // merge_size**2  # of merge_size x merge_size patches
    if units:
        rows = max(d for d in range(1, math.isqrt(units) + 1) if units % d == 0)  # near square: few windows
        grids = [*grids, (1, rows * merge_size, units // rows * merge_size)]
    tensors, ints = {}, {}
    for name, value in family.batch_metadata(tower, grids).items():
        if isinstance(value, int):
            ints[name] = _next_power_of_two(value)
        elif name.startswith("cu_"):
            length = _next_power_of_two(value.shape[0])
            tensors[name] = torch.cat([value, value[-1:].expand(length - value.shape[0])])
        else:
            tensors[name] = value
    key = (bucket, *sorted(ints.items()), *sorted((name, tuple(t.shape)) for name, t in tensors.items()))
    return PaddedBatch(bucket, tensors, ints, key)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    pixels: torch.Tensor  # static inputs, written before each replay
    meta: dict[str, torch.Tensor]
    outputs: list[torch.Tensor]  # static outputs, read after each replay
    loaded: PaddedBatch  # the batch whose metadata ``meta`` holds


class GraphedTower:
    """Runs a tower's forward through CUDA graphs, for batches of up to ``max_patches`` patches.

    ``run`` returns None for a batch it does not take (more than ``max_patches`` patches, or a
    new shape once ``max_graphs`` are held: each costs a capture and device memory); the caller
    then runs the forward directly.
    """

    def __init__(
        self,
        run: TowerRun,
        family: ModelFamily,
        tower: nn.Module,
        merge_size: int,
        patch_dim: int,
        device: torch.device,
        dtype: torch.dtype,
        max_patches: int = 65536,
        patch_step: int = 256,
        max_graphs: int = 128,
    ) -> None:
        if not family.cuda_graphs:
            raise ValueError(f"CUDA graphs do not support {type(family).__name__}")
        self._run = run
        self._family = family
        self._tower = tower
        self._merge_size = merge_size
        self._patch_dim = patch_dim
        self._device = device
        self._dtype = dtype
        self.max_patches = max_patches
        self.patch_step = patch_step
        self.max_graphs = max_graphs
        self._pool = torch.cuda.graph_pool_handle()
        self._graphs: dict[tuple, _Captured] = {}
        # Traffic repeats its batches' grids (one resolution's batches of each size), so each is
        # padded and pinned once; a graph whose last replay had the same grids needs no copies.
        self._padded = functools.lru_cache(maxsize=64)(self._pad)

    @property
    def captured(self) -> int:
        return len(self._graphs)

    def run(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> list[torch.Tensor] | None:
        """The forward of ``pixels`` (on the device, in the tower's dtype) by replaying a graph."""
        patches = pixels.shape[0]
        if patches > self.max_patches:
            return None
        batch = self._padded(tuple(grids))
        captured = self._graphs.get(batch.key)
        if captured is None:
            if len(self._graphs) >= self.max_graphs:
                return None  # too many batch shapes (resolutions) to hold a graph for each
            captured = self._graphs[batch.key] = self._capture(batch)
            log.info("captured a CUDA graph for %d patches (%d graphs)", batch.patches, len(self._graphs))
        captured.pixels[:patches].copy_(pixels, non_blocking=True)
        if captured.loaded is not batch:
            for name, value in batch.tensors.items():
                captured.meta[name].copy_(value, non_blocking=True)
            captured.loaded = batch
        captured.graph.replay()
        tokens = patches // self._merge_size**2
        return [output[:tokens] for output in captured.outputs]

    def _pad(self, grids: tuple[tuple[int, int, int], ...]) -> PaddedBatch:
        batch = pad_batch(self._family, self._tower, self._merge_size, list(grids), self.patch_step)
        # Pinned: a copy from it does not wait for the device.
        return replace(batch, tensors={name: value.pin_memory() for name, value in batch.tensors.items()})

    def _capture(self, batch: PaddedBatch) -> _Captured:
        pixels = torch.zeros(batch.patches, self._patch_dim, device=self._device, dtype=self._dtype)
        meta = {name: value.to(self._device) for name, value in batch.tensors.items()}
        ints = batch.ints
        grid = torch.zeros(1, 3, dtype=torch.int64, device=self._device)  # unused: the metadata is given

        def forward() -> list[torch.Tensor]:
            return self._run(pixels, grid, {**meta, **ints})

        # Warm up on a side stream (lazy initialisation, compilation for new sizes), then capture.
        current = torch.cuda.current_stream(self._device)
        side = torch.cuda.Stream(self._device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            forward()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the preprocessing threads keep using CUDA while this thread captures.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            outputs = forward()
        return _Captured(graph, pixels, meta, outputs, batch)
