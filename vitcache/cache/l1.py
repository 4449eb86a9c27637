"""The in-process tier (L1): an LRU bounded by payload bytes, and its keys.

A module of its own, without Redis, so that what only sizes or simulates L1 (the load test's
ideal-LRU curve) need not import the Redis tier.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable

from vitcache.cache.entry import CachedEmbedding


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
    Thread-safe: the batcher's worker thread and the event loop may both touch it.
    """

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError("capacity_bytes must be >= 0")
        self.capacity_bytes = capacity_bytes
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

    def put(self, key: Hashable, entry: CachedEmbedding) -> bool:
        """Stores ``entry``; returns False if it is larger than the whole cache."""
        size = entry.nbytes
        if size > self.capacity_bytes:
            return False
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes_used -= old.nbytes
            while self.bytes_used + size > self.capacity_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.bytes_used -= evicted.nbytes
                self.evictions += 1
            self._entries[key] = entry
            self.bytes_used += size
            return True
