"""The in-process tier (L1): an LRU bounded by payload bytes, and its keys.

A module of its own, without Redis, so that what only sizes or simulates L1 (the load test's
ideal-LRU curve) need not import the Redis tier.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable

from vitcache.cache.arena import ArenaEntry, SharedArena
from vitcache.cache.entry import CachedEmbedding
from vitcache.digest import DIGEST_SIZE


def l1_key(digest: bytes, tenant: str = "") -> bytes:
    """The L1 key of ``digest`` for ``tenant``; the plain digest when there is no tenant."""
    return digest if not tenant else tenant.encode() + b"\0" + digest


def l1_put_key(key: str, tenant: str = "") -> tuple[str, str, str]:
    """The L1 key of a Put entry: a tuple, so it can never equal a digest's (bytes) key."""
    return ("put", tenant, key)


class L1Cache:
    """Least-recently-used map key -> entry, bounded by the entries' payload bytes.

    Invariants:
    - ``bytes_used`` is the sum of ``nbytes`` of the held entries and never exceeds ``capacity_bytes``.
    - An entry larger than the whole capacity is not stored (it would evict everything).
    - ``get`` refreshes recency; ``put`` of a held digest replaces it.
    - With an ``arena``, a stored entry's bytes are copied into it (the held entry views them there) and
      a dropped entry is marked dropped in it; an entry the arena has no room for even once everything
      else is evicted (blocks still viewed elsewhere) is held in private memory;
    - an entry under a plain digest key (no tenant, not a Put key) is in the arena's shared index.
    Thread-safe: the batcher's worker thread and the event loop may both touch it.
    """

    def __init__(self, capacity_bytes: int, arena: SharedArena | None = None) -> None:
        if capacity_bytes < 0:
            raise ValueError("capacity_bytes must be >= 0")
        self.capacity_bytes = capacity_bytes
        self.arena = arena
        self.bytes_used = 0
        self.evictions = 0
        self._entries: OrderedDict[Hashable, CachedEmbedding] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> CachedEmbedding | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: Hashable, entry: CachedEmbedding) -> CachedEmbedding | None:
        """Stores ``entry``; returns it as held (with an arena, the copy there: answer with that one, so
        the reply reads the shared memory same-host readers read), or None if it is larger than the cache."""
        size = entry.nbytes
        if size > self.capacity_bytes:
            return None
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._forget(old)
            while self.bytes_used + size > self.capacity_bytes:
                self._evict_oldest()
            if self.arena is not None:
                indexed = isinstance(key, bytes) and len(key) == DIGEST_SIZE  # a tenant's key is longer
                entry = self._in_arena(entry, self.arena, key if indexed else b"")
            self._entries[key] = entry
            self.bytes_used += size
            return entry

    def _in_arena(self, entry: CachedEmbedding, arena: SharedArena, digest: bytes) -> CachedEmbedding:
        """``entry`` copied into ``arena`` (and indexed by ``digest``, if any), evicting older entries while it has
        no room."""
        while (stored := arena.store(entry, digest)) is None and self._entries:
            self._evict_oldest()
        return entry if stored is None else stored

    def _evict_oldest(self) -> None:
        _, evicted = self._entries.popitem(last=False)
        self._forget(evicted)
        self.evictions += 1

    def _forget(self, entry: CachedEmbedding) -> None:
        self.bytes_used -= entry.nbytes
        if isinstance(entry, ArenaEntry) and self.arena is not None:
            self.arena.drop(entry)
