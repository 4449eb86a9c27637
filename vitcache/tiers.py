"""The two cache tiers: an in-process LRU (L1) and a shared Redis (L2).

Both are keyed by the image digest; the model namespace is fixed per process, so L1 holds
only this namespace's entries and L2 prefixes every key with it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from vitcache.entry import CachedEmbedding, CorruptEntry

log = logging.getLogger(__name__)


class L1Cache:
    """Least-recently-used map digest -> entry, bounded by the entries' payload bytes.

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
        self._entries: OrderedDict[bytes, CachedEmbedding] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: bytes) -> CachedEmbedding | None:
        with self._lock:
            entry = self._entries.get(digest)
            if entry is not None:
                self._entries.move_to_end(digest)
            return entry

    def put(self, digest: bytes, entry: CachedEmbedding) -> bool:
        """Stores ``entry``; returns False if it is larger than the whole cache."""
        size = entry.nbytes
        if size > self.capacity_bytes:
            return False
        with self._lock:
            old = self._entries.pop(digest, None)
            if old is not None:
                self.bytes_used -= old.nbytes
            while self.bytes_used + size > self.capacity_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.bytes_used -= evicted.nbytes
                self.evictions += 1
            self._entries[digest] = entry
            self.bytes_used += size
            return True


@dataclass
class RedisStats:
    errors: int = 0
    corrupt: int = 0


class RedisTier:
    """L2 in Redis, degrading to "always miss" while Redis is down or slow.

    Every call is bounded by ``timeout_s``. After a failure the tier stops calling Redis
    for a backoff period (doubling up to ``max_backoff_s``) and then tries again, so a
    dead Redis costs one timeout per backoff window, not one per image. redis-py's pool
    reconnects by itself once the server is back. A value that fails its checks is a
    miss (and is counted); the next computation overwrites it.
    """

    def __init__(
        self,
        url: str,
        namespace: str,
        ttl_s: int | None = None,
        timeout_s: float = 0.5,
        max_backoff_s: float = 5.0,
    ) -> None:
        self._client = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, health_check_interval=30
        )
        self._prefix = f"vitcache:v1:{namespace}:".encode()
        self._ttl_s = ttl_s
        self._timeout_s = timeout_s
        self._max_backoff_s = max_backoff_s
        self._backoff_s = 0.0
        self._retry_at = 0.0
        self.connected = False
        self.stats = RedisStats()

    def key(self, digest: bytes) -> bytes:
        return self._prefix + digest.hex().encode()

    def _available(self) -> bool:
        return self.connected or time.monotonic() >= self._retry_at

    def _ok(self) -> None:
        if not self.connected:
            log.info("redis: connected")
        self.connected = True
        self._backoff_s = 0.0

    def _failed(self, exc: BaseException) -> None:
        if self.connected:
            log.warning("redis: unavailable (%s); serving from L1 and compute", exc)
        self.connected = False
        self.stats.errors += 1
        self._backoff_s = min(self._max_backoff_s, max(0.1, self._backoff_s * 2))
        self._retry_at = time.monotonic() + self._backoff_s

    async def _call(self, coro):  # type: ignore[no-untyped-def]
        # asyncio.wait_for bounds the whole call, reconnects included.
        return await asyncio.wait_for(coro, self._timeout_s)

    async def ping(self) -> bool:
        try:
            await self._call(self._client.ping())
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self._failed(exc)
            return False
        self._ok()
        return True

    async def get(self, digest: bytes) -> CachedEmbedding | None:
        if not self._available():
            return None
        try:
            value = await self._call(self._client.get(self.key(digest)))
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self._failed(exc)
            return None
        self._ok()
        if value is None:
            return None
        try:
            return CachedEmbedding.from_value(value)
        except CorruptEntry as exc:
            self.stats.corrupt += 1
            log.warning("redis: dropping corrupt entry %s: %s", digest.hex(), exc)
            await self._delete(digest)
            return None

    async def put(self, digest: bytes, entry: CachedEmbedding) -> bool:
        if not self._available():
            return False
        try:
            await self._call(self._client.set(self.key(digest), entry.to_value(), ex=self._ttl_s))
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self._failed(exc)
            return False
        self._ok()
        return True

    async def _delete(self, digest: bytes) -> None:
        try:
            await self._call(self._client.delete(self.key(digest)))
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self._failed(exc)

    async def close(self) -> None:
        await self._client.aclose()
