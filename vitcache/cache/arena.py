"""Shared memory for cache entries: the L1's bytes in one memfd that same-host clients map read-only.

Why: a shared-memory hit then costs the server no copy at all. It names where the entry lies
(offset, length, generation) and the client copies the bytes out of its own read-only mapping.

Each entry occupies one block::

    generation (u64 LE), header offset and length (u32 LE each), padded to ALIGNMENT
    | output 0 | output 1 | ... (each output ALIGNMENT-aligned) | header (JSON: ``vitcache.wire.shm_index``)

The header tells a client that found the block through the shared index (``vitcache.cache.shared_index``)
how to decode it without asking the server; plain digest keys only are indexed.

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
import itertools
import json
import threading
import weakref
from dataclasses import dataclass

from vitcache.cache.entry import CachedEmbedding
from vitcache.cache.shared_index import SharedIndex, read_only_fd, sealed_memfd
from vitcache.wire.shm_index import HEADER_SPAN, slot_count
from vitcache.wire.shm_protocol import ALIGNMENT, GENERATION, aligned
from vitcache.wire.tensor_codec import TensorBytes

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
    """An entry whose outputs view its block of a :class:`SharedArena` (``at``: the block's offset; ``digest``:
    its key in the shared index, empty if it is not indexed)."""

    at: int = 0
    generation: int = 0
    digest: bytes = b""

    def output_offsets(self) -> list[int]:
        return output_offsets(self.at, self)


def output_offsets(at: int, entry: CachedEmbedding) -> list[int]:
    """Where each output of ``entry`` lies in a block at ``at``: after the generation, each aligned."""
    offsets, offset = [], at + ALIGNMENT
    for out in entry.outputs:
        offsets.append(offset)
        offset += aligned(out.nbytes)
    return offsets


def block_header(entry: CachedEmbedding, digest: bytes) -> bytes:
    """What a client needs to decode the block without asking (offsets from the block's start)."""
    offsets = output_offsets(0, entry)
    outputs = [[out.dtype, list(out.shape), at, out.nbytes] for out, at in zip(entry.outputs, offsets, strict=True)]
    header = {"digest": digest.hex(), "grid_thw": list(entry.grid_thw), "outputs": outputs}
    if entry.video is not None:
        header["video"] = entry.video.to_json()
    return json.dumps(header, separators=(",", ":")).encode()


def outputs_size(entry: CachedEmbedding) -> int:
    return sum(aligned(out.nbytes) for out in entry.outputs)


class SharedArena:
    """The L1's bytes: a sealed 0600 memfd, mapped writable here only.

    Invariants:
    - a block is written only between its lease and its first generation store, so a reader holding
      a generation never sees its bytes change without the generation changing first;
    - a dropped entry's block is leased again only once no object in this process views its bytes
      (its :class:`ArenaEntry` is gone), so gRPC replies being built from it stay whole;
    - ``index`` names a block only from its generation store until it is marked dropped.
    Thread-safe: L1 stores from the batcher's thread, and blocks come back from whichever thread
    drops an entry's last reference (even one inside ``store``, by garbage collection: so a dead entry's
    block only joins ``_unviewed``, taken back under the lock by the next call).
    """

    def __init__(self, capacity: int) -> None:
        self.fd, self._map = sealed_memfd(SHARED_ARENA_NAME, capacity)
        self.index = SharedIndex(slot_count(capacity))
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

    def store(self, entry: CachedEmbedding, digest: bytes = b"") -> ArenaEntry | None:
        """A copy of ``entry`` in a new block, found through the shared index by ``digest`` (if any and a slot
        is free); None when no free range is large enough."""
        header = block_header(entry, digest)
        header_at = ALIGNMENT + outputs_size(entry)
        with self._lock:
            self._take_back_unviewed()
            at = self._leases.lease(header_at + len(header))
            generation = next(self._generations)
        if at is None:
            return None
        outputs = []
        for out, offset in zip(entry.outputs, output_offsets(at, entry), strict=True):
            self._view[offset : offset + out.nbytes] = out.data
            outputs.append(TensorBytes(out.dtype, out.shape, self._view[offset : offset + out.nbytes].toreadonly()))
        self._view[at + header_at : at + header_at + len(header)] = header
        HEADER_SPAN.pack_into(self._view, at + GENERATION.size, header_at, len(header))
        GENERATION.pack_into(self._view, at, generation)  # last: the block is whole from here on
        with self._lock:
            indexed = bool(digest) and self.index.publish(digest, at, generation)
        stored = ArenaEntry(
            grid_thw=entry.grid_thw,
            outputs=tuple(outputs),
            video=entry.video,
            at=at,
            generation=generation,
            digest=digest if indexed else b"",
        )
        weakref.finalize(stored, self._unviewed.append, at).atexit = False
        return stored

    def drop(self, entry: ArenaEntry) -> None:
        """Marks ``entry``'s block as no longer holding it (after taking it out of the index): readers with its
        generation retry."""
        with self._lock:
            if entry.digest:
                self.index.withdraw(entry.digest, entry.generation)
            GENERATION.pack_into(self._view, entry.at, next(self._generations) + 1)  # odd: dropped

    def _take_back_unviewed(self) -> None:
        while self._unviewed:
            self._leases.release(self._unviewed.popleft())

    def read_only_fd(self) -> int:
        return read_only_fd(self.fd)


def shared_arena_bytes(l1_bytes: int) -> int:
    """Room for an L1 of ``l1_bytes``: its entries, their blocks' headers and alignment, and the blocks of
    dropped entries still viewed by replies in flight (which the L1 no longer counts)."""
    return l1_bytes + l1_bytes // 8 + (16 << 20)
