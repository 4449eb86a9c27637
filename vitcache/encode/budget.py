"""A bound on decoded pixels in flight, shared by every request of one pipeline.

A small file can decode to many pixels (an 8000x8000 PNG of 62 KB takes about 1 GB of memory
while it is decoded and preprocessed), so counting requests or files bounds nothing: each image
takes its pixel count, known from its header, before it is decoded and gives it back once it is
preprocessed.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from vitcache.errors import ErrorCode, ImageError


class PixelBudget:
    """Weighted FIFO semaphore of pixels on one event loop.

    Invariants: ``in_use <= capacity`` always (``peak`` is its high-water mark); images are
    granted in arrival order, so a large image waits for room but is never overtaken forever
    by small ones; a waiter whose deadline passes or whose call is cancelled leaves the queue
    holding nothing.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("max_decoded_pixels_in_flight must be >= 1")
        self.capacity = capacity
        self.in_use = 0
        self.peak = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def take(self, pixels: int, deadline: float | None) -> None:
        """Waits until ``pixels`` fit (until ``deadline``, ``time.monotonic()``); raises ImageError
        RESOURCE_EXHAUSTED for an image larger than the whole budget, DEADLINE_EXCEEDED past the deadline."""
        if pixels > self.capacity:
            raise ImageError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"image of {pixels} pixels is over the decoded pixel budget of {self.capacity} "
                "(--max-decoded-pixels-in-flight)",
            )
        if not self._waiters and self.in_use + pixels <= self.capacity:
            self._grant(pixels)
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((pixels, waiter))
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            await asyncio.wait_for(waiter, timeout)
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():  # granted just as its caller gave up
                self.give_back(pixels)
            elif (pixels, waiter) in self._waiters:  # `_wake` drops a cancelled head itself
                self._waiters.remove((pixels, waiter))
                self._wake()  # it may have been the head that held the others back
            if isinstance(exc, asyncio.TimeoutError):
                raise ImageError(
                    ErrorCode.DEADLINE_EXCEEDED, "deadline passed while waiting for the decoded pixel budget"
                ) from None
            raise

    def give_back(self, pixels: int) -> None:
        self.in_use -= pixels
        self._wake()

    def _grant(self, pixels: int) -> None:
        self.in_use += pixels
        self.peak = max(self.peak, self.in_use)

    def _wake(self) -> None:
        while self._waiters:
            pixels, waiter = self._waiters[0]
            if waiter.done():  # cancelled; its caller removes it when it runs
                self._waiters.popleft()
                continue
            if self.in_use + pixels > self.capacity:
                return
            self._waiters.popleft()
            self._grant(pixels)
            waiter.set_result(None)
