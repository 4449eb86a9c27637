"""The hook through which the engine and the batcher report what they do.

The library depends on no metrics system: it calls an :class:`EngineObserver`, whose
methods do nothing unless a subclass overrides them (``vitcache.server.metrics`` does, with
Prometheus). Calls come from the event loop, the preprocessing threads and the forward
thread, once or a few times per image: an implementation must be thread-safe, must not
block and must not raise.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from vitcache.outcomes import ImageOutcome

#: queue: batcher wait from a miss's arrival to the start of its forward;
#: preprocess: decode + preprocess, including the wait for a preprocessing thread;
#: forward: one vision forward, outputs copied to CPU bytes (from its launch, so it includes
#: waiting for the batch ahead of it on the device);
#: launch: the CPU time to queue one forward and its copies on the device;
#: device: one forward and its copies executing on the device (CUDA only);
#: l1_get/l2_get, l1_put/l2_put: one cache read or write.
Stage = Literal["queue", "preprocess", "forward", "launch", "device", "l1_get", "l2_get", "l1_put", "l2_put"]
Tier = Literal["l1", "l2"]


class EngineObserver:
    """Receives the engine's stage timings and outcomes; the default ignores them all.

    An observer that does not override :meth:`stage_timed` is not timed at all (:meth:`timed`
    then costs next to nothing), so the default observer adds no clock reads to the hit path.
    """

    _times_stages = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls._times_stages = cls.stage_timed is not EngineObserver.stage_timed

    def stage_timed(self, stage: Stage, seconds: float) -> None:
        """One image (queue, preprocess, cache stages) or one batch (forward) spent ``seconds`` in ``stage``."""

    def cache_lookup(self, tier: Tier, hit: bool) -> None:
        """One lookup of one digest in ``tier``."""

    def forward_done(self, images: int, patches: int) -> None:
        """A vision forward of ``images`` images and ``patches`` patches succeeded."""

    def image_done(self, outcome: ImageOutcome) -> None:
        """The engine answered one image (a success with a source, or an error)."""

    def timed(self, stage: Stage) -> _StageTimer:
        """``with observer.timed(stage): ...`` reports the block's wall time, also when it raises."""
        return _StageTimer(self, stage) if self._times_stages else _NOT_TIMED


_NOT_TIMED = contextlib.nullcontext()


class _StageTimer:
    __slots__ = ("_observer", "_stage", "_start")

    def __init__(self, observer: EngineObserver, stage: Stage) -> None:
        self._observer = observer
        self._stage = stage
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self._observer.stage_timed(self._stage, time.perf_counter() - self._start)
