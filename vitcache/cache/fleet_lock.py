"""Fleet-wide single flight: a miss is computed by one replica while the others wait for its L2 value.

A replica that misses in L2 takes a lock key next to the value's key (``SET key token NX
PX ttl``, in a script that also takes over a key of another type, which no replica left: a
corrupt entry, counted as such); the replicas that fail to take it poll L2 until the
holder's value appears, and compute themselves once the lock is gone without a value (the holder died or failed) or
after the lock's lifetime. The holder writes the value to L2 before it releases the lock
with a compare-and-delete script, so it never deletes a lock that expired and was taken
by another replica since.

Invariants:
- A dead holder blocks the others for at most ``ttl_s`` (the lock expires by itself); a live
  one releases its lock even when its L2 write failed and the tier is backing off.
- A waiter never waits longer than ``ttl_s`` plus one poll, whatever Redis does.
- A replica that takes the lock looks in L2 once more before computing, so a value written
  between its last poll and its taking the lock is used, not recomputed.
- While Redis is unavailable nobody waits: every replica computes (the tier's backoff).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import secrets

from vitcache.cache.entry import CachedEmbedding
from vitcache.cache.tiers import L2Unavailable, RedisTier

# Takes the lock (KEYS[1] = lock, ARGV[1] = token, ARGV[2] = ttl in ms): 1 taken, 0 held by another,
# 2 taken over a key of another type than a lock's (which would otherwise block every claim for ever).
_TAKE = """
if redis.call("set", KEYS[1], ARGV[1], "NX", "PX", ARGV[2]) then
    return 1
end
if redis.call("type", KEYS[1]).ok == "string" then
    return 0
end
redis.call("set", KEYS[1], ARGV[1], "PX", ARGV[2])
return 2
"""

# Deletes the lock only if it still holds our token (KEYS[1] = lock, ARGV[1] = token).
_RELEASE = """
if redis.call("get", KEYS[1]) == ARGV[1] then
    return redis.call("del", KEYS[1])
end
return 0
"""


class Claim(enum.Enum):
    """How a replica proceeds with a miss."""

    HOLDER = "holder"  # it took the lock: compute, write L2, release
    ALONE = "alone"  # no lock to be had (Redis down, or the wait ran out): compute anyway


class FleetLock:
    """Takes and releases the per-image compute lock in the L2 Redis (or Redis Cluster)."""

    def __init__(self, l2: RedisTier, ttl_s: float = 10.0, poll_s: float = 0.01, max_poll_s: float = 0.1) -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be > 0")
        self.l2 = l2
        self.ttl_s = ttl_s
        self.poll_s = poll_s
        self.max_poll_s = max_poll_s
        self.waits = 0  # misses that waited on another replica's computation

    def _lock_key(self, digest: bytes, tenant: str) -> bytes:
        return self.l2.key(digest, tenant) + b":lock"

    async def _try_take(self, key: bytes, token: str) -> bool:
        ttl_ms = max(1, int(self.ttl_s * 1000))
        taken = await self.l2.execute(lambda r: r.eval(_TAKE, 1, key, token, ttl_ms))
        if taken == 2:
            self.l2.count_corrupt(key, "a lock key of another type than a lock's")
        return taken != 0

    async def claim(self, digest: bytes, tenant: str = "") -> tuple[Claim, str] | CachedEmbedding:
        """The value another replica computed, or how to go on: (HOLDER, token) or (ALONE, "")."""
        key, token = self._lock_key(digest, tenant), secrets.token_hex(16)
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self.ttl_s
        delay, waited = self.poll_s, False
        try:
            while True:
                if await self._try_take(key, token):
                    # The previous holder may have written its value and released just now.
                    entry = await self.l2.get(digest, tenant)
                    if entry is None:
                        return Claim.HOLDER, token
                    await self.release(digest, tenant, token)
                    return entry
                if not waited:
                    waited = True
                    self.waits += 1
                entry = await self.l2.get(digest, tenant)
                if entry is not None:
                    return entry
                if loop.time() >= give_up_at:
                    return Claim.ALONE, ""
                await asyncio.sleep(delay)
                delay = min(self.max_poll_s, delay * 2)
        except L2Unavailable:
            return Claim.ALONE, ""

    async def release(self, digest: bytes, tenant: str, token: str) -> None:
        key = self._lock_key(digest, tenant)
        # Tried even while the tier backs off (a failed or slow L2 write just before sets it off):
        # a lock left behind holds the other replicas' misses of this image for its whole lifetime.
        with contextlib.suppress(L2Unavailable):  # else it expires by itself
            await self.l2.execute(lambda r: r.eval(_RELEASE, 1, key, token), probe=True)
