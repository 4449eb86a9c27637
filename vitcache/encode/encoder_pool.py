"""One encoder process per device behind one :class:`~vitcache.encode.pipeline.Pipeline`.

Why one pool rather than one server per GPU: the serving process, L1, single flight and the
fleet lock stay one per host, so an image is computed once on the host whatever GPU runs it,
and a GPU that dies costs its in-flight images a second try elsewhere, not a client error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence

from vitcache.cache.entry import CachedEmbedding
from vitcache.config import EncoderConfig
from vitcache.encode.encoder_process import EncoderProcess
from vitcache.encode.pipeline import PipelineConfig
from vitcache.errors import ConfigError, ErrorCode, ImageError
from vitcache.inputs import Computable, Scope
from vitcache.models.loading import EncoderLoader, EncoderSpec
from vitcache.observer import EngineObserver
from vitcache.stats import BatcherStats, EncoderStatus

log = logging.getLogger(__name__)


def parse_devices(text: str, cuda_count: Callable[[], int] | None = None) -> list[str]:
    """``--device`` as a list of devices: ``cpu``, ``cuda:N``, a comma-separated list of those, or
    ``cuda`` / ``all`` for every visible GPU (counted by ``cuda_count``, torch's by default)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names in (["cuda"], ["all"]):
        if cuda_count is None:
            import torch

            cuda_count = torch.cuda.device_count
        count = cuda_count()
        if count == 0:
            raise ConfigError(f"--device {text}: no CUDA device is visible (check the driver, or use --device cpu)")
        return [f"cuda:{i}" for i in range(count)]
    if not names:
        raise ConfigError("--device is empty: name cpu, cuda, cuda:N, a list such as cuda:0,cuda:1, or all")
    for name in names:
        kind, _, index = name.partition(":")
        if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
            raise ConfigError(f"--device {text}: {name!r} is not cpu, cuda or cuda:N")
    cuda = [name for name in names if name.startswith("cuda")]
    if len(set(cuda)) != len(cuda) or (cuda and len(cuda) != len(names)):
        raise ConfigError(f"--device {text}: name each GPU once, and do not mix cpu with cuda")
    return names


class _Slot:
    """A device's encoder process, and what it did before its last restart."""

    def __init__(self, loader: EncoderLoader) -> None:
        self.loader = loader
        self.process: EncoderProcess | None = None
        self.alive = False
        self.in_flight = 0
        self.restarts = 0
        self.retired = BatcherStats()  # counters of the processes this slot has lost
        self.restarting: asyncio.Task[None] | None = None

    @property
    def stats(self) -> BatcherStats:
        return self.retired if self.process is None else self.retired + self.process.stats


class EncoderPool:
    """A :class:`~vitcache.encode.pipeline.Pipeline` over one :class:`EncoderProcess` per device.

    Invariants:
    - An image goes to the live encoder with the fewest images in flight (ties: the first
      device), so work never queues on a busy GPU while another has less.
    - An image whose encoder dies before answering is computed again on another live encoder, once:
      if that one dies under it too, it fails INTERNAL (an image that kills encoders must not take
      down every device, nor, as UNAVAILABLE, send a fleet client on to the next replica). Its caller
      sees UNAVAILABLE only when no encoder is alive.
    - A dead encoder is started again in the background, after ``restart_backoff_s`` doubling up
      to ``max_restart_backoff_s`` while starts keep failing; it takes no images until then.
    - ``on_unavailable`` runs when the last live encoder dies; ``on_available`` when one is alive
      again after that. Every encoder serves the same namespace (a restart that would change it is refused).
    """

    def __init__(
        self,
        loaders: Sequence[EncoderLoader],
        pipeline: PipelineConfig | None = None,
        observer: EngineObserver | None = None,
        ring_bytes: int = EncoderConfig.encoder_ring_bytes,
        restart_backoff_s: float = EncoderConfig.encoder_restart_backoff_s,
        max_restart_backoff_s: float = 60.0,
    ) -> None:
        if not loaders:
            raise ValueError("an encoder pool needs at least one device")
        self.pipeline_config = pipeline or PipelineConfig()
        self.observer = observer or EngineObserver()
        self.ring_bytes = ring_bytes
        self.restart_backoff_s = restart_backoff_s
        self.max_restart_backoff_s = max_restart_backoff_s
        self.spec: EncoderSpec
        self._slots = [_Slot(loader) for loader in loaders]
        self._stopping = False
        self._signalled_unavailable = False  # on_unavailable ran and on_available has not since
        self.on_unavailable: Callable[[], Awaitable[None]] | None = None
        self.on_available: Callable[[], Awaitable[None]] | None = None

    @property
    def stats(self) -> BatcherStats:
        return sum((slot.stats for slot in self._slots), BatcherStats())

    def encoders(self) -> list[EncoderStatus]:
        """Per device; its counters cover every process it has had. A device named twice (the CPU,
        in tests) is told apart by its position: ``cpu#0``, ``cpu#1``."""
        names = [slot.loader.device for slot in self._slots]
        return [
            EncoderStatus(
                name if names.count(name) == 1 else f"{name}#{i}",
                slot.alive,
                slot.stats,
                dict(slot.process.device_memory()) if slot.alive and slot.process is not None else {},
                slot.in_flight,
                slot.restarts,
            )
            for i, (name, slot) in enumerate(zip(names, self._slots, strict=True))
        ]

    @property
    def live(self) -> int:
        return sum(slot.alive for slot in self._slots)

    @property
    def pids(self) -> list[int | None]:
        return [slot.process.pid if slot.process is not None else None for slot in self._slots]

    async def load(self) -> None:
        """Starts every encoder at once; fails (stopping those that started) if any cannot start."""
        started = await asyncio.gather(*(self._start(slot) for slot in self._slots), return_exceptions=True)
        failures = [(s, exc) for s, exc in zip(self._slots, started, strict=True) if isinstance(exc, BaseException)]
        if failures:
            await self.stop()
            slot, exc = failures[0]
            if isinstance(exc, ConfigError):  # the operator's to fix: its message says how
                raise exc
            raise RuntimeError(f"the encoder on {slot.loader.device} did not start: {exc}") from exc
        specs = {slot.process.spec.namespace for slot in self._slots if slot.process is not None}
        if len(specs) != 1:
            await self.stop()
            raise RuntimeError("the encoders computed different namespaces: every device must load the same model")
        self.spec = self._slots[0].process.spec  # type: ignore[union-attr]

    async def start(self) -> None:
        if not any(slot.process is not None for slot in self._slots):
            await self.load()

    async def stop(self) -> None:
        self._stopping = True
        for slot in self._slots:
            if slot.restarting is not None:
                slot.restarting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await slot.restarting
        await asyncio.gather(
            *(slot.process.stop() for slot in self._slots if slot.process is not None), return_exceptions=True
        )
        for slot in self._slots:
            slot.alive = False

    async def compute(self, image: Computable, scope: Scope) -> CachedEmbedding:
        tried: set[int] = set()
        while True:
            index = self._pick(tried)
            if index is None:
                raise ImageError(
                    ErrorCode.UNAVAILABLE,
                    f"no encoder is running ({len(self._slots)} devices, restarting with back-off)",
                )
            slot = self._slots[index]
            assert slot.process is not None
            process = slot.process
            slot.in_flight += 1
            try:
                return await process.compute(image, scope)
            except ImageError as exc:
                if exc.code is not ErrorCode.UNAVAILABLE or process.alive:
                    raise
                if tried:  # a second encoder died under it: the image itself may be what kills them
                    raise ImageError(
                        ErrorCode.INTERNAL, "two encoder processes died while computing this image; not tried again"
                    ) from exc
                tried.add(index)
                log.warning("encoder on %s died with an image in flight; computing it elsewhere", slot.loader.device)
            finally:
                slot.in_flight -= 1

    def _pick(self, tried: set[int]) -> int | None:
        live = [i for i, slot in enumerate(self._slots) if slot.alive and i not in tried]
        return min(live, key=lambda i: self._slots[i].in_flight, default=None)

    async def _start(self, slot: _Slot) -> None:
        loader = slot.loader
        process = EncoderProcess(loader, self.pipeline_config, self.observer, ring_bytes=self.ring_bytes)
        await process.load()
        if hasattr(self, "spec") and process.spec.namespace != self.spec.namespace:
            await process.stop()
            raise RuntimeError(f"the encoder on {loader.device} now computes another namespace")
        process.on_unavailable = lambda: self._lost(slot, process)
        slot.process, slot.alive = process, True

    async def _lost(self, slot: _Slot, process: EncoderProcess) -> None:
        """The process of ``slot`` died: stop routing to it, keep its counters, restart it."""
        if self._stopping or slot.process is not process:
            return
        # Everything up to the restart's scheduling happens before any await: a second death or a
        # finished restart in between must see this slot dead.
        slot.alive = False
        slot.retired = slot.retired + process.stats
        slot.process = None
        none_left = self.live == 0
        slot.restarting = asyncio.ensure_future(self._restart(slot))
        log.error("encoder on %s died; %d of %d devices left", slot.loader.device, self.live, len(self._slots))
        if none_left:
            self._signalled_unavailable = True
            await self._notify(self.on_unavailable)
        with contextlib.suppress(Exception):  # its ring, pipe and reader thread; the child is gone
            await process.stop()

    async def _restart(self, slot: _Slot) -> None:
        backoff = self.restart_backoff_s
        while not self._stopping:
            await asyncio.sleep(backoff)
            try:
                await self._start(slot)
            except Exception as exc:
                device = slot.loader.device
                log.error("restarting the encoder on %s failed (%s); next try in %.0f s", device, exc, backoff)
                backoff = min(self.max_restart_backoff_s, backoff * 2)
                continue
            slot.restarts += 1
            slot.restarting = None
            log.info("encoder on %s restarted (%d devices live)", slot.loader.device, self.live)
            if self._signalled_unavailable:
                self._signalled_unavailable = False
                await self._notify(self.on_available)
            return

    @staticmethod
    async def _notify(callback: Callable[[], Awaitable[None]] | None) -> None:
        if callback is None:
            return
        try:
            await callback()
        except Exception:  # a health update failing must not stop restarts
            log.exception("encoder pool: a state-change callback failed")


def pool_loaders(loader: EncoderLoader, devices: Sequence[str]) -> list[EncoderLoader]:
    """``loader`` once per device."""
    return [loader.on(device) for device in devices]
