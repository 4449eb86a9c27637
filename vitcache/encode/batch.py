"""Dynamic batching of cache misses: file decoding and vision-tower forwards."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from vitcache.cache.entry import CachedEmbedding
from vitcache.config import BatchingConfig
from vitcache.encode.split import copy_to_host
from vitcache.errors import ErrorCode, ImageError
from vitcache.models.loading import VisionEncoder
from vitcache.observer import EngineObserver
from vitcache.stats import BatcherStats

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: Turns one image's outputs, CPU tensors viewing a batch's host buffer, into its entry, in the
#: order the batch's images come (one collector thread). Copying them out is its job: the
#: buffer is reused.
Materialize = Callable[[tuple[int, int, int], list[torch.Tensor]], CachedEmbedding]


async def gather_batch(
    queue: deque[T], wakeup: asyncio.Event, budget: int, cost: Callable[[T], int], max_wait_s: float
) -> list[T]:
    """Takes the next batch off ``queue``: FIFO, total cost within ``budget`` (a first item over it
    goes alone), waiting at most ``max_wait_s`` after the first item for more to arrive."""
    loop = asyncio.get_running_loop()
    while not queue:
        wakeup.clear()
        await wakeup.wait()
    batch = [queue.popleft()]
    spent = cost(batch[0])
    deadline = loop.time() + max_wait_s
    while spent < budget:
        if not queue:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            wakeup.clear()
            try:
                await asyncio.wait_for(wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                break
            continue
        if spent + cost(queue[0]) > budget:
            break
        item = queue.popleft()
        batch.append(item)
        spent += cost(item)
    return batch


def deliver(futures: list[asyncio.Future[R]], results: list[R | Exception]) -> None:
    """Resolves each still-waiting future with its result, or raises its exception into it."""
    for future, result in zip(futures, results, strict=True):
        if future.done():
            continue
        if isinstance(result, Exception):
            future.set_exception(result)
        else:
            future.set_result(result)


@dataclass
class _Pending:
    pixel_values: torch.Tensor
    grid_thw: tuple[int, int, int]
    future: asyncio.Future[CachedEmbedding]
    deadline: float | None = None  # time.monotonic(); past it the image is dropped, not run
    patches: int = field(init=False)
    queued_at: float = field(init=False, default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        t, h, w = self.grid_thw
        self.patches = t * h * w


@dataclass
class _Launched:
    """A batch whose forward and host copies are queued on the device."""

    batch: list[_Pending]
    host: list[tuple[torch.Tensor, ...]]  # per output kind, then the finite-rows flags, per image
    copied: torch.cuda.Event | None  # None once waited for, and on the CPU (done at once)
    started: float
    on_device: torch.cuda.Event | None = None  # recorded before the forward, timing it with `copied`


class Batcher:
    """Packs images from concurrent requests into forwards of one encoder.

    Invariants:
    - A forward holds at most ``max_batch_patches`` patches, except an image that alone
      exceeds the budget, which runs alone (it may still fit in memory).
    - Images start in arrival order; one that does not fit opens the next batch.
    - Forwards are launched by one worker thread, in order; at most ``max_batches_in_flight``
      are queued on the device at once (until their copies to the host are done), so the next
      batch's CPU work (concatenation, grid metadata, kernel launches) overlaps the current
      batch's GPU work, and a collector thread turns finished batches into entries meanwhile.
    - A forward that runs out of device memory is split in halves and retried; an image
      that runs out alone fails with RESOURCE_EXHAUSTED. Other images are unaffected.
    - Results leave the worker as CPU bytes (:class:`CachedEmbedding`), never device tensors.
    - An image whose output holds a NaN or an infinity fails with INTERNAL: it is never an entry,
      so it is never cached (checked on the device, read with the outputs: no extra wait).
    - An image whose deadline has passed when its batch closes fails with DEADLINE_EXCEEDED
      and never reaches the device.
    """

    def __init__(
        self,
        encoder: VisionEncoder,
        max_batch_patches: int,
        max_wait_s: float = BatchingConfig.max_batch_wait_s,
        observer: EngineObserver | None = None,
        materialize: Materialize = CachedEmbedding.from_tensors,
    ) -> None:
        if max_batch_patches < 1:
            raise ValueError("max_batch_patches must be >= 1")
        self.encoder = encoder
        self.max_batch_patches = max_batch_patches
        self.max_wait_s = max_wait_s
        self.stats = BatcherStats()
        self.observer = observer or EngineObserver()
        self.materialize = materialize
        self._queue: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vitcache-forward")
        # Waits for finished batches and builds their entries, so the worker can launch the next one.
        self._collector = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vitcache-collect")
        self.max_batches_in_flight = 2
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="vitcache-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for item in self._queue:
            item.future.cancel()
        self._worker.shutdown(wait=True)
        self._collector.shutdown(wait=True)

    async def submit(
        self, pixel_values: torch.Tensor, grid_thw: tuple[int, int, int], deadline: float | None = None
    ) -> CachedEmbedding:
        future: asyncio.Future[CachedEmbedding] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(pixel_values, grid_thw, future, deadline))
        self._wakeup.set()
        return await future

    async def _next_batch(self) -> list[_Pending]:
        batch = await gather_batch(
            self._queue, self._wakeup, self.max_batch_patches, lambda item: item.patches, self.max_wait_s
        )
        now = time.monotonic()
        for item in batch:
            if item.deadline is not None and now >= item.deadline and not item.future.done():
                item.future.set_exception(ImageError(ErrorCode.DEADLINE_EXCEEDED, "deadline passed while queued"))
        return [item for item in batch if not item.future.done()]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        # A slot is a batch on the device; it frees when the batch's copies to the host are done,
        # before its entries are built, so the next batch is launched while that goes on.
        slots = asyncio.Semaphore(self.max_batches_in_flight)
        finishing: set[asyncio.Future[None]] = set()
        while True:
            await slots.acquire()
            batch = await self._next_batch()
            if not batch:
                slots.release()
                continue
            started = time.perf_counter()
            for item in batch:
                self.observer.stage_timed("queue", started - item.queued_at)
            try:
                launched = await loop.run_in_executor(self._worker, self._launch, batch)
            except Exception as exc:  # a bug, not bad input: fail this batch, keep serving
                launched = self._failed(batch, exc)
            # The next batch is prepared (CPU) while this one still runs on the device.
            finish = asyncio.ensure_future(self._complete(batch, launched, slots.release))
            finishing.add(finish)
            finish.add_done_callback(finishing.discard)

    async def _complete(
        self,
        batch: list[_Pending],
        launched: _Launched | list[CachedEmbedding | ImageError],
        free_slot: Callable[[], None],
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            try:
                await loop.run_in_executor(self._collector, self._wait_for_device, launched)
            finally:
                free_slot()
            results = await loop.run_in_executor(self._collector, self._finish, launched)
        except Exception as exc:
            results = self._failed(batch, exc)
        deliver([item.future for item in batch], results)

    @staticmethod
    def _failed(batch: list[_Pending], exc: Exception) -> list[CachedEmbedding | ImageError]:
        log.error("forward failed", exc_info=exc)
        return [ImageError(ErrorCode.INTERNAL, f"vision forward failed: {exc}")] * len(batch)

    def _launch(self, batch: list[_Pending]) -> _Launched | list[CachedEmbedding | ImageError]:
        """Worker thread: queues the forward and the copies to the host; splits on out-of-memory."""
        started = time.perf_counter()
        try:
            pixel_values, grid = self._inputs(batch)
            on_device = None
            if self.encoder.device.type == "cuda":  # after the CPU work above: device time is the GPU's alone
                on_device = torch.cuda.Event(enable_timing=True)
                on_device.record()
            outputs = self.encoder.forward_packed(pixel_values, grid)
            # Per output row, whether it is all finite: travels with the outputs, read once they are on the host.
            finite = torch.stack([output.reshape(len(output), -1).isfinite().all(dim=1) for output in outputs])
            outputs = [*outputs, finite.all(dim=0)]
            host, copied = copy_to_host(outputs, [self.encoder.tokens_for(item.grid_thw) for item in batch])
            self.observer.stage_timed("launch", time.perf_counter() - started)
            return _Launched(batch, host, copied, started, on_device)
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(batch) == 1:
                item = batch[0]
                return [
                    ImageError(
                        ErrorCode.RESOURCE_EXHAUSTED,
                        f"image of {item.patches} patches ran out of device memory on its own",
                    )
                ]
            self.stats.oom_splits += 1
            half = len(batch) // 2
            log.warning("out of memory on %d images; retrying as %d + %d", len(batch), half, len(batch) - half)
            return self._finish(self._launch(batch[:half])) + self._finish(self._launch(batch[half:]))

    def _wait_for_device(self, launched: _Launched | list[CachedEmbedding | ImageError]) -> None:
        """Waits until a launched batch's copies to the host are done (once; later calls return)."""
        if isinstance(launched, list) or launched.copied is None:
            return
        launched.copied.synchronize()
        if launched.on_device is not None:
            seconds = launched.on_device.elapsed_time(launched.copied) / 1e3
            self.stats.device_seconds += seconds
            self.observer.stage_timed("device", seconds)
        launched.copied = None

    def _finish(self, launched: _Launched | list[CachedEmbedding | ImageError]) -> list[CachedEmbedding | ImageError]:
        """Waits for a launched batch's copies and cuts them into per-image CPU entries."""
        if isinstance(launched, list):
            return launched
        self._wait_for_device(launched)
        batch = launched.batch
        self.stats.batches += 1
        self.stats.images += len(batch)
        patches = sum(item.patches for item in batch)
        self.stats.patches += patches
        self.observer.stage_timed("forward", time.perf_counter() - launched.started)
        self.observer.forward_done(len(batch), patches)
        *host, finite = launched.host
        return [
            self.materialize(item.grid_thw, [kind[i] for kind in host])
            if finite[i].all()
            else ImageError(ErrorCode.INTERNAL, "the vision tower's output for this image is not finite (NaN or Inf)")
            for i, item in enumerate(batch)
        ]

    def _inputs(self, batch: list[_Pending]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's pixel values joined on the device, and its grids (on the CPU: no sync to read them)."""
        device = self.encoder.device
        if device.type == "cuda":
            stream = torch.cuda.current_stream(device)
            for item in batch:  # made on a preprocessing stream: keep their memory until this stream is done
                if item.pixel_values.is_cuda:
                    item.pixel_values.record_stream(stream)
        pixel_values = torch.cat([item.pixel_values.to(device, non_blocking=True) for item in batch])
        return pixel_values, torch.tensor([item.grid_thw for item in batch], dtype=torch.int64)
