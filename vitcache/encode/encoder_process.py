"""The device side of misses in a child process that owns the device.

Why a process: in one process, the thread that launches the vision forward's kernels shares
the GIL with the event loop that speaks gRPC and copies megabytes of embeddings per image, so
launches wait behind serialization and the GPU idles between kernels (the reason vLLM's V1
engine core runs apart from its API server). The child runs an :class:`EncodePipeline` on an
event loop of its own; the parent, which serves requests, never opens a CUDA context.

Protocol, over one duplex ``multiprocessing`` pipe of pickled tuples:

- parent -> child: ``(request id, image, deadline)`` per image; ``None`` to stop.
- child -> parent: ``("ready", EncoderSpec)`` or ``("failed", message or ConfigError)`` once, then per image
  ``(request id, result, observer events, BatcherStats fields, device memory)``, where the
  result is an :class:`ImageError`, a :class:`_InRing` or, for an image the ring has no room
  for, the :class:`CachedEmbedding` itself.

Embeddings travel through a shared-memory ring (a memfd both processes map, handed over the
pipe). The batcher's collector thread copies each image's outputs from the pinned host buffer
straight into the ring (torch copies, which release the GIL the kernel launches need).
Invariants: the child reserves space in the order it sends replies (the collector reserves in
batch order, and the batch's futures resolve, and so its replies leave, in that order) and the
parent reads replies in that order, so the parent frees space by publishing the end position of
the last reply it has copied out (``_Ring.release``); the child never writes past that position
plus the ring's capacity. The parent copies each image out of the ring before the engine sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import mmap
import multiprocessing as mp
import os
import sys
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import astuple, dataclass, replace
from multiprocessing import reduction
from multiprocessing.connection import Connection

import numpy as np
import torch

from vitcache.cache.entry import CachedEmbedding
from vitcache.config import EncoderConfig
from vitcache.encode.pipeline import EncodePipeline, PipelineConfig
from vitcache.errors import ConfigError, ErrorCode, ImageError
from vitcache.inputs import Computable, PixelRows, Scope
from vitcache.models.loading import EncoderLoader, EncoderSpec, VisionEncoder
from vitcache.observer import EngineObserver, Stage
from vitcache.stats import BatcherStats, EncoderStatus
from vitcache.wire.tensor_codec import TensorBytes, dtype_name
from vitcache.wire.timing import VideoTiming

log = logging.getLogger(__name__)

_HEADER = 64  # the ring's first bytes: the parent's release position (int64)
_SWITCH_INTERVAL_S = 0.0005


class _Ring:
    """A byte ring over shared memory: positions only grow; a position's offset is ``pos % capacity``."""

    def __init__(self, buffer: mmap.mmap) -> None:
        self._buffer = buffer
        self._view = memoryview(buffer)
        self._released = self._view[:8].cast("q")  # written by the parent only; an aligned 8-byte store
        self.capacity = len(buffer) - _HEADER
        self._reserved = 0  # child side: end of the last reservation
        self._bytes = torch.frombuffer(buffer, dtype=torch.uint8)  # the buffer as a tensor, to copy with

    def reserve(self, nbytes: int) -> tuple[int, int] | None:
        """Child: (start, end) of ``nbytes`` of contiguous space, or None until the parent frees some.
        A reservation that would wrap skips the ring's tail instead."""
        start = self._reserved
        offset = start % self.capacity
        if offset + nbytes > self.capacity:
            start += self.capacity - offset
        end = start + nbytes
        if end - self._released[0] > self.capacity:
            return None
        self._reserved = end
        return start, end

    def write(self, start: int, tensors: Sequence[torch.Tensor]) -> list[memoryview]:
        """Child: copies contiguous CPU tensors in one after another (torch copies, without the
        GIL); returns the ring's bytes that now hold each."""
        at, views = _HEADER + start % self.capacity, []
        for tensor in tensors:
            flat = tensor.reshape(-1).view(torch.uint8)
            self._bytes[at : at + flat.numel()].copy_(flat)
            views.append(self._view[at : at + flat.numel()])
            at += flat.numel()
        return views

    def read(self, start: int, lengths: Sequence[int]) -> list[memoryview]:
        """Parent: copies of consecutive chunks from ``start``. numpy copies, which release the GIL
        and stay on this thread: torch's would wake its intra-op thread pool, whose spinning
        workers took seven cores from the clients and the encoder process (bench/miss_path.py)."""
        at, chunks = _HEADER + start % self.capacity, []
        for length in lengths:
            copy = np.empty(length, dtype=np.uint8)
            np.copyto(copy, np.frombuffer(self._buffer, np.uint8, length, at))
            chunks.append(memoryview(copy))
            at += length
        return chunks

    def release(self, end: int) -> None:
        """Parent: everything before ``end`` has been read."""
        self._released[0] = end

    def close(self) -> None:
        del self._bytes  # its export of the buffer must go before the buffer can close
        self._released.release()
        self._view.release()
        self._buffer.close()


@dataclass(frozen=True)
class _InRing:
    """An embedding the child wrote into the ring at [start, end)."""

    grid_thw: tuple[int, int, int]
    outputs: tuple[tuple[str, tuple[int, ...], int], ...]  # (dtype, shape, nbytes) per output
    start: int
    end: int
    video: VideoTiming | None = None

    def take(self, ring: _Ring) -> CachedEmbedding:
        data = ring.read(self.start, [nbytes for _, _, nbytes in self.outputs])
        ring.release(self.end)
        return CachedEmbedding(
            self.grid_thw,
            tuple(
                TensorBytes(dtype, shape, chunk) for (dtype, shape, _), chunk in zip(self.outputs, data, strict=True)
            ),
            self.video,
        )


@dataclass(frozen=True, kw_only=True)  # keywords: CachedEmbedding may grow fields
class _RingEntry(CachedEmbedding):
    """Child side: an entry written into the ring at [start, end) (its outputs view the ring)."""

    start: int = 0
    end: int = 0

    def reply(self) -> _InRing:
        outputs = tuple((out.dtype, out.shape, out.nbytes) for out in self.outputs)
        return _InRing(self.grid_thw, outputs, self.start, self.end, self.video)


class EncoderProcess:
    """A :class:`~vitcache.encode.pipeline.Pipeline` whose encoder lives in a child process.

    ``load`` (or ``start``, which loads if needed) spawns the child and waits until the model
    ``loader`` describes is loaded (and compiled) there; ``spec`` is then the child's :class:`EncoderSpec`. If the
    child dies, pending and later images fail with UNAVAILABLE; answers from the caches are
    unaffected.
    """

    def __init__(
        self,
        loader: EncoderLoader,
        pipeline: PipelineConfig | None = None,
        observer: EngineObserver | None = None,
        ring_bytes: int = EncoderConfig.encoder_ring_bytes,
        start_timeout_s: float = 3600.0,
    ) -> None:
        self.loader = loader
        self.pipeline_config = pipeline or PipelineConfig()
        self.observer = observer or EngineObserver()
        self.ring_bytes = ring_bytes
        self.start_timeout_s = start_timeout_s
        self.spec: EncoderSpec
        self._stats = BatcherStats()
        self._memory: dict[str, int] = {}
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future[CachedEmbedding]] = {}
        self._unavailable: str | None = None  # set once the child is gone
        # Embeddings that came through the ring, and those that found it full (a bigger ring helps).
        self.through_ring = self.through_pipe = 0
        self._stopping = False
        self._process: mp.process.BaseProcess | None = None
        #: Run on the event loop once the child has died (a server marks itself not serving).
        self.on_unavailable: Callable[[], Awaitable[None]] | None = None
        self._notified: asyncio.Future[None] | None = None

    @property
    def stats(self) -> BatcherStats:
        return self._stats

    @property
    def alive(self) -> bool:
        """Started and not known to have died."""
        return self._process is not None and self._unavailable is None and not self._stopping

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def device_memory(self) -> dict[str, int]:
        return self._memory

    def encoders(self) -> list[EncoderStatus]:
        return [EncoderStatus(self.loader.device, self.alive, self._stats, self._memory)]

    async def start(self) -> None:
        if self._process is None:
            await self.load()

    async def load(self) -> None:
        context = mp.get_context("spawn")  # a forked child could not use CUDA
        self._conn, child_end = context.Pipe(duplex=True)
        loader, visible = _sees_only_its_gpu(self.loader)
        self._process = context.Process(
            target=_child_main, args=(child_end, loader, self.pipeline_config), name="vitcache-encoder", daemon=False
        )
        with _environment("CUDA_VISIBLE_DEVICES", visible):  # the spawned child's environment is copied in start()
            self._process.start()
        child_end.close()
        fd = os.memfd_create("vitcache-encoder-ring")
        try:
            os.ftruncate(fd, _HEADER + self.ring_bytes)
            self._ring = _Ring(mmap.mmap(fd, _HEADER + self.ring_bytes))
            reduction.send_handle(self._conn, fd, self._process.pid)
        finally:
            os.close(fd)
        self._loop = asyncio.get_running_loop()
        try:
            first = await self._loop.run_in_executor(None, self._first_message)
        except BaseException:  # cancelled (a server stopping during a restart): leave no child behind
            self._process.kill()
            self._conn.close()  # ends the wait of _first_message's thread too
            self._ring.close()
            raise
        if first[0] != "ready":
            await self._reap()
            if isinstance(first[1], ConfigError):
                raise first[1]
            raise RuntimeError(f"encoder process failed to start: {first[1]}")
        self.spec = first[1]
        self._reader = threading.Thread(target=self._read, name="vitcache-encoder-reader", daemon=True)
        self._reader.start()

    def _first_message(self) -> tuple[str, object]:
        if not self._conn.poll(self.start_timeout_s):
            return "failed", f"no answer within {self.start_timeout_s:.0f} s"
        try:
            return self._conn.recv()
        except EOFError:
            assert self._process is not None
            self._process.join(5)
            return "failed", f"exited with code {self._process.exitcode} (see its log above)"

    async def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):  # already gone
            self._conn.send(None)
        await self._reap()
        self._reader.join(10)
        self._ring.close()

    async def _reap(self) -> None:
        assert self._process is not None
        await self._loop.run_in_executor(None, self._process.join, 30)
        if self._process.is_alive():
            self._process.kill()
            await self._loop.run_in_executor(None, self._process.join)
        self._conn.close()

    async def compute(self, image: Computable, scope: Scope) -> CachedEmbedding:
        if self._unavailable is not None:
            raise ImageError(ErrorCode.UNAVAILABLE, self._unavailable)
        if isinstance(image, PixelRows) and not isinstance(image.data, bytes):
            image = replace(image, data=bytes(image.data))  # a view of the request: copy to pickle
        request_id = next(self._ids)
        future = self._loop.create_future()
        self._pending[request_id] = future
        try:
            try:
                self._conn.send((request_id, image, scope.deadline))
            except OSError as exc:  # died before the reader thread noticed
                self._unavailable = f"encoder process is gone: {exc}"
                raise ImageError(ErrorCode.UNAVAILABLE, self._unavailable) from exc
            return await future
        finally:
            self._pending.pop(request_id, None)

    def _read(self) -> None:
        """Reader thread: takes each reply out of the ring (in order) and resolves its future."""
        while True:
            try:
                request_id, result, events, stats, memory = self._conn.recv()
            except (EOFError, OSError):
                break
            if isinstance(result, _InRing):
                result = result.take(self._ring)
                self.through_ring += 1
            elif isinstance(result, CachedEmbedding):
                self.through_pipe += 1
            for event in events:
                if event[0] == "forward":
                    self.observer.forward_done(event[1], event[2])
                else:
                    self.observer.stage_timed(event[1], event[2])
            self._stats, self._memory = BatcherStats(*stats), memory
            self._loop.call_soon_threadsafe(self._resolve, request_id, result)
        self._loop.call_soon_threadsafe(self._child_gone)

    def _resolve(self, request_id: int, result: CachedEmbedding | ImageError) -> None:
        future = self._pending.get(request_id)
        if future is None or future.done():
            return  # its caller gave up (deadline, cancelled request)
        if isinstance(result, ImageError):
            future.set_exception(result)
        else:
            future.set_result(result)

    def _child_gone(self) -> None:
        if self._stopping:
            return
        assert self._process is not None
        # It has closed its end: it is exiting or gone (no join here: this is the event loop).
        self._unavailable = f"encoder process exited (code {self._process.exitcode}); no image can be computed"
        log.error(self._unavailable)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ImageError(ErrorCode.UNAVAILABLE, self._unavailable))
        if self.on_unavailable is not None:
            self._notified = asyncio.ensure_future(self.on_unavailable())


def _sees_only_its_gpu(loader: EncoderLoader) -> tuple[EncoderLoader, str | None]:
    """The loader as the child runs it, and the CUDA_VISIBLE_DEVICES it runs under.

    A child on ``cuda:N`` sees that GPU alone, as its ``cuda:0``: the threads of its pipeline
    (preprocessing, the batcher's launches) each start on device 0, so any stream, event or
    tensor made without naming a device lands on the right GPU, and no context opens on another.
    """
    if not loader.device.startswith("cuda:"):
        return loader, None
    index = int(loader.device.partition(":")[2])
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    physical = visible.split(",")[index].strip() if visible else str(index)
    return loader.on("cuda:0"), physical


@contextlib.contextmanager
def _environment(name: str, value: str | None) -> Iterator[None]:
    """``name=value`` in this process's environment meanwhile (nothing when ``value`` is None)."""
    if value is None:
        yield
        return
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


class _RelayObserver(EngineObserver):
    """Child side: keeps the pipeline's timings for the next reply to carry to the parent's observer."""

    def __init__(self) -> None:
        self.events: deque[tuple[str, Stage | int, float | int]] = deque()

    def stage_timed(self, stage: Stage, seconds: float) -> None:
        self.events.append(("stage", stage, seconds))

    def forward_done(self, images: int, patches: int) -> None:
        self.events.append(("forward", images, patches))

    def drain(self) -> list[tuple[str, Stage | int, float | int]]:
        drained = []
        while self.events:
            drained.append(self.events.popleft())
        return drained


def _child_main(conn: Connection, loader: EncoderLoader, pipeline: PipelineConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s (encoder): %(message)s")
    # The launching thread gives up the GIL at every torch call; with the default 5 ms switch
    # interval each call can wait that long to get it back from a preprocessing thread.
    sys.setswitchinterval(_SWITCH_INTERVAL_S)
    if loader.device.startswith("cuda"):
        # On CUDA the CPU only copies bytes here; an intra-op pool's spinning workers would take
        # cores from the serving process and its clients for nothing.
        torch.set_num_threads(1)
    fd = reduction.recv_handle(conn)
    ring = _Ring(mmap.mmap(fd, 0))
    os.close(fd)
    try:
        encoder = loader.load()
    except ConfigError as exc:  # the operator's to fix, said in its message: the parent raises it as it is
        conn.send(("failed", exc))
        return
    except Exception as exc:
        log.exception("loading the encoder failed")
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    asyncio.run(_ChildServer(conn, ring).run(encoder, pipeline))


class _ChildServer:
    def __init__(self, conn: Connection, ring: _Ring) -> None:
        self.conn = conn
        self.ring = ring
        self.relay = _RelayObserver()

    async def run(self, encoder: VisionEncoder, config: PipelineConfig) -> None:
        try:
            self.pipeline = EncodePipeline(encoder, config, self.relay, materialize=self._into_ring)
        except ConfigError as exc:  # --video-decoder cuda without NVDEC: the parent raises it as it is
            self.conn.send(("failed", exc))
            return
        await self.pipeline.start()
        loop = asyncio.get_running_loop()
        stopped = asyncio.Event()
        tasks: set[asyncio.Task[None]] = set()

        def start_one(message: tuple[int, Computable, float | None]) -> None:
            task = loop.create_task(self._serve(*message))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        def read() -> None:  # reader thread: the parent's requests onto the loop
            while True:
                try:
                    message = self.conn.recv()
                except (EOFError, OSError):  # the parent is gone
                    message = None
                if message is None:
                    loop.call_soon_threadsafe(stopped.set)
                    return
                loop.call_soon_threadsafe(start_one, message)

        self.conn.send(("ready", self.pipeline.spec))
        threading.Thread(target=read, name="vitcache-encoder-requests", daemon=True).start()
        await stopped.wait()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.pipeline.stop()

    async def _serve(self, request_id: int, image: Computable, deadline: float | None) -> None:
        result: _InRing | CachedEmbedding | ImageError
        try:
            entry = await self.pipeline.compute(image, Scope("", deadline))
            # No await from here to the send: replies leave in the order their ring space was reserved.
            result = entry.reply() if isinstance(entry, _RingEntry) else entry
        except ImageError as exc:
            result = exc
        except Exception as exc:  # a bug, not bad input: fail this image, keep serving
            log.exception("computing an image failed")
            result = ImageError(ErrorCode.INTERNAL, f"encoder process: {type(exc).__name__}: {exc}")
        stats = astuple(self.pipeline.stats)
        with contextlib.suppress(OSError):  # the parent is gone; the reader thread stops the loop
            self.conn.send((request_id, result, self.relay.drain(), stats, self.pipeline.device_memory()))

    def _into_ring(self, grid_thw: tuple[int, int, int], tensors: list[torch.Tensor]) -> CachedEmbedding:
        """The batcher's collector thread: writes an image's outputs into the ring, in batch order.
        One that does not fit (the parent has not caught up, or it is larger than the ring) travels
        as bytes instead: waiting here could wait for this very batch's replies."""
        span = self.ring.reserve(sum(t.numel() * t.element_size() for t in tensors))
        if span is None:
            return CachedEmbedding.from_tensors(grid_thw, tensors)
        views = self.ring.write(span[0], tensors)
        outputs = tuple(
            TensorBytes(dtype_name(t.dtype), tuple(t.shape), v) for t, v in zip(tensors, views, strict=True)
        )
        return _RingEntry(tuple(grid_thw), outputs, start=span[0], end=span[1])
