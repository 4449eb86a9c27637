"""Shared memory for cache entries: the L1's bytes in one memfd that same-host clients map read-only.

Why: a shared-memory hit then costs the server no copy at all. It names where the entry lies
(offset, length, generation) and the client copies the bytes out of its own read-only mapping.

Each entry occupies one block::

    generation (u64 LE), padded to ALIGNMENT | output 0 | output 1 | ...   (each output ALIGNMENT-aligned)

Seqlock-style reading: a block's generation is set, after its outputs are written, to a number no
block ever carried before; when the L1 drops the entry (eviction, replacement) the generation is
overwritten with a fresh odd number (even numbers mark live entries) before the block's space can be
reused. A reader copies the outputs and then compares the generation with the one it was given: equal
means the copy is whole. This relies on stores being seen in program order and loads done in program
order, which x86-64 guarantees (the only platform the shared-memory path is tested on).
"""

from __future__ import annotations

import bisect
import collections
import fcntl
import itertools
import mmap
import os
import threading
import weakref
from dataclasses import dataclass

from vitcache.cache.entry import CachedEmbedding
from vitcache.wire.shm_protocol import ALIGNMENT, GENERATION, aligned
from vitcache.wire.tensor_codec import TensorBytes

#: Linux >= 5.1: no new writable mapping and no write(2) (ours, made before it, stays writable);
#: not in Python 3.11's fcntl module.
F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)
#: Sealed before any client gets the memfd: no one can resize it (a shrunk file makes the server's next
#: write a SIGBUS), write to it or map it writable, or change these seals.
SHARED_ARENA_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SEAL
SHARED_ARENA_NAME = "vitcache-l1"


class FirstFitLeases:
    """Leases of aligned ranges of ``[0, capacity)``, first fit.

    Invariants:
    - ``_free`` holds sorted, disjoint, non-empty ``(start, end)`` ranges, never two adjacent
      (a release merges with its neighbours), so no fragmentation outlives its leases;
    - every lease starts and ends on a multiple of ``ALIGNMENT``;
    - ``leased_bytes`` + free bytes == ``capacity``.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity - capacity % ALIGNMENT
        self.leased_bytes = 0
        self._free: list[tuple[int, int]] = [(0, self.capacity)] if self.capacity else []
        self._leases: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._leases)

    def lease(self, size: int) -> int | None:
        """The start of a free range of at least ``size`` bytes, now leased; None if none is free."""
        size = max(ALIGNMENT, aligned(size))
        for i, (start, end) in enumerate(self._free):
            if end - start >= size:
                if end - start == size:
                    del self._free[i]
                else:
                    self._free[i] = (start + size, end)
                self._leases[start] = start + size
                self.leased_bytes += size
                return start
        return None

    def release(self, start: int) -> bool:
        """Frees the lease at ``start``; False if there is none."""
        end = self._leases.pop(start, None)
        if end is None:
            return False
        self.leased_bytes -= end - start
        i = bisect.bisect_left(self._free, (start, end))
        if i > 0 and self._free[i - 1][1] == start:
            start = self._free.pop(i - 1)[0]
            i -= 1
        if i < len(self._free) and self._free[i][0] == end:
            end = self._free.pop(i)[1]
        self._free.insert(i, (start, end))
        return True


@dataclass(frozen=True, eq=False, kw_only=True)  # keywords: CachedEmbedding may grow fields
class ArenaEntry(CachedEmbedding):
    """An entry whose outputs view its block of a :class:`SharedArena` (``at``: the block's offset)."""

    at: int = 0
    generation: int = 0

    def output_offsets(self) -> list[int]:
        return output_offsets(self.at, self)


def output_offsets(at: int, entry: CachedEmbedding) -> list[int]:
    """Where each output of ``entry`` lies in a block at ``at``: after the generation, each aligned."""
    offsets, offset = [], at + ALIGNMENT
    for out in entry.outputs:
        offsets.append(offset)
        offset += aligned(out.nbytes)
    return offsets


def block_size(entry: CachedEmbedding) -> int:
    return ALIGNMENT + sum(aligned(out.nbytes) for out in entry.outputs)


class SharedArena:
    """The L1's bytes: a sealed 0600 memfd, mapped writable here only.

    Invariants:
    - a block is written only between its lease and its first generation store, so a reader holding
      a generation never sees its bytes change without the generation changing first;
    - a dropped entry's block is leased again only once no object in this process views its bytes
      (its :class:`ArenaEntry` is gone), so gRPC replies being built from it stay whole.
    Thread-safe: L1 stores from the batcher's thread, and blocks come back from whichever thread
    drops an entry's last reference (even one inside ``store``, by garbage collection: so a dead entry's
    block only joins ``_unviewed``, taken back under the lock by the next call).
    """

    def __init__(self, capacity: int) -> None:
        fd = os.memfd_create(SHARED_ARENA_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, capacity)
            self._map = mmap.mmap(fd, capacity)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SHARED_ARENA_SEALS)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.capacity = capacity
        self._view = memoryview(self._map)
        self._leases = FirstFitLeases(capacity)
        self._lock = threading.Lock()
        self._generations = itertools.count(2, 2)  # even: a live entry
        self._unviewed: collections.deque[int] = collections.deque()

    @property
    def leased_bytes(self) -> int:
        with self._lock:
            self._take_back_unviewed()
            return self._leases.leased_bytes

    def store(self, entry: CachedEmbedding) -> ArenaEntry | None:
        """A copy of ``entry`` in a new block; None when no free range is large enough."""
        with self._lock:
            self._take_back_unviewed()
            at = self._leases.lease(block_size(entry))
            generation = next(self._generations)
        if at is None:
            return None
        outputs = []
        for out, offset in zip(entry.outputs, output_offsets(at, entry), strict=True):
            self._view[offset : offset + out.nbytes] = out.data
            outputs.append(TensorBytes(out.dtype, out.shape, self._view[offset : offset + out.nbytes].toreadonly()))
        GENERATION.pack_into(self._view, at, generation)  # last: the block is whole from here on
        stored = ArenaEntry(
            grid_thw=entry.grid_thw, outputs=tuple(outputs), video=entry.video, at=at, generation=generation
        )
        weakref.finalize(stored, self._unviewed.append, at).atexit = False
        return stored

    def drop(self, entry: ArenaEntry) -> None:
        """Marks ``entry``'s block as no longer holding it; readers with its generation retry."""
        with self._lock:
            GENERATION.pack_into(self._view, entry.at, next(self._generations) + 1)  # odd: dropped

    def _take_back_unviewed(self) -> None:
        while self._unviewed:
            self._leases.release(self._unviewed.popleft())

    def read_only_fd(self) -> int:
        """A new descriptor of the memfd opened read-only (the caller closes it); with the seals,
        whoever holds it can map the arena for reading only."""
        return os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)


def shared_arena_bytes(l1_bytes: int) -> int:
    """Room for an L1 of ``l1_bytes``: its entries, their blocks' headers and alignment, and the blocks of
    dropped entries still viewed by replies in flight (which the L1 no longer counts)."""
    return l1_bytes + l1_bytes // 8 + (16 << 20)
