"""The shared tier (L2): Redis; the in-process LRU (L1) is ``vitcache.cache.l1``.

Both are keyed by the image digest, or by a caller's key for entries stored with Put (a key
space of its own in both tiers); the model namespace is fixed per process, so L1 holds
only this namespace's entries and L2 prefixes every key with it. A tenant (optional) scopes
both: it is part of the L1 key and of the L2 key prefix, so tenants never see each other's
entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import parse_url
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from vitcache.cache.entry import CachedEmbedding, CorruptEntry
from vitcache.errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: What a failed or slow Redis (or Redis Cluster) call raises.
REDIS_FAILURES = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError)


def check_redis_url(url: str) -> None:
    """Raises ConfigError for a URL redis-py cannot connect with. Its message never repeats the URL,
    which may hold a password."""
    try:
        parse_url(url)
    except ValueError as e:
        raise ConfigError(
            f"bad Redis URL: {e}; write redis://HOST:PORT/DB (rediss:// for TLS, unix:///PATH for a socket)"
        ) from e


class L2Unavailable(Exception):
    """Redis is down, slow or backing off; the caller goes on without it."""


class WrongTypeKey(L2Unavailable):
    """Redis answered, but the key holds another type than vitcache puts there (a LIST where a value
    belongs): that one entry is corrupt, Redis is up. Callers that skip L2 on failure skip it too."""


def redacted(url: str) -> str:
    """``url`` for a log line: its password (and query, which may hold one) left out."""
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if ":" in userinfo:
        userinfo = userinfo.partition(":")[0] + ":***"
    return urlunsplit(parts._replace(netloc=userinfo + at + hostport, query=""))


@dataclass
class RedisStats:
    errors: int = 0
    corrupt: int = 0


class RedisTier:
    """L2 in Redis, degrading to "always miss" while Redis is down or slow.

    Every call is bounded by ``timeout_s``. After a failure the tier stops calling Redis
    for a backoff period (doubling up to ``max_backoff_s``) and then tries again, so a
    dead Redis costs one timeout per backoff window, not one per image. redis-py's pool
    reconnects by itself once the server is back. The first call's outcome and every change
    between up and down are logged. A value that fails its checks, or a key of another type
    than a value's, is a miss (and is counted as corrupt, not as a failure: the tier stays up);
    the next computation overwrites it. With ``cluster`` the URL
    names one seed node of a Redis Cluster; keys are spread over its masters by hash slot
    and the same degrade-and-reconnect rules hold (the client re-learns the slot map).
    """

    def __init__(
        self,
        url: str,
        namespace: str,
        ttl_s: int | None = None,
        timeout_s: float = 0.5,
        max_backoff_s: float = 5.0,
        cluster: bool = False,
    ) -> None:
        client_class = RedisCluster if cluster else aioredis.Redis
        self._client: Any = client_class.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, health_check_interval=30
        )
        self.url = redacted(url)
        self._prefix = f"vitcache:v1:{namespace}:".encode()
        # Put entries: a prefix no digest key starts with, whatever the tenant's name.
        self._put_prefix = f"vitcache:put:v1:{namespace}:".encode()
        self._ttl_s = ttl_s
        self._timeout_s = timeout_s
        self._max_backoff_s = max_backoff_s
        self._backoff_s = 0.0
        self._retry_at = 0.0
        self.connected = False
        self._logged_connected: bool | None = None  # the state last logged; None before the first call
        self.stats = RedisStats()

    def key(self, digest: bytes, tenant: str = "") -> bytes:
        scope = f"{tenant}:".encode() if tenant else b""
        return self._prefix + scope + digest.hex().encode()

    def put_key(self, key: str, tenant: str = "") -> bytes:
        """The Redis key of a Put entry (the caller's key in hex: any UTF-8 is safe in it)."""
        return self._put_prefix + f"{tenant}:".encode() + key.encode().hex().encode()

    def _available(self) -> bool:
        return self.connected or time.monotonic() >= self._retry_at

    def _ok(self) -> None:
        if self._logged_connected is not True:
            log.info("redis: connected to %s", self.url)
        self.connected = self._logged_connected = True
        self._backoff_s = 0.0

    def _failed(self, exc: BaseException) -> None:
        if self._logged_connected is not False:
            log.warning(
                "redis: %s unavailable (%s); serving from L1 and compute, retrying in the background",
                self.url,
                str(exc) or type(exc).__name__,  # a timeout's text is empty
            )
        self.connected = self._logged_connected = False
        self.stats.errors += 1
        self._backoff_s = min(self._max_backoff_s, max(0.1, self._backoff_s * 2))
        self._retry_at = time.monotonic() + self._backoff_s

    async def execute(self, command: Callable[[Any], Awaitable[T]], *, probe: bool = False) -> T:
        """Runs one call on the Redis client, bounded by the timeout (reconnects included).

        Raises :class:`L2Unavailable` on failure, and without calling while backing off
        (unless ``probe``). Other parts that keep state in the same Redis (the fleet lock)
        go through here, so they share the tier's backoff.
        """
        if not probe and not self._available():
            raise L2Unavailable("backing off")
        try:
            result = await asyncio.wait_for(command(self._client), self._timeout_s)
        except REDIS_FAILURES as exc:
            if isinstance(exc, ResponseError) and "WRONGTYPE" in str(exc):  # in a script: "...: WRONGTYPE ..."
                self._ok()
                raise WrongTypeKey(str(exc)) from exc
            self._failed(exc)
            raise L2Unavailable(str(exc)) from exc
        except Exception as exc:
            # redis-py's clients raise other errors too while nodes fail (an AttributeError from a
            # connection closed under a command: redis/redis-py#3546, #3835; seen in
            # tests/test_cluster.py). A cache tier failing must cost a miss, never the request.
            # The backoff keeps this to one traceback per window.
            log.warning("redis: the client raised %s", type(exc).__name__, exc_info=exc)
            self._failed(exc)
            raise L2Unavailable(f"{type(exc).__name__}: {exc}") from exc
        self._ok()
        return result

    async def ping(self) -> bool:
        try:
            await self.execute(lambda r: r.ping(), probe=True)
        except L2Unavailable:
            return False
        return True

    async def get(self, digest: bytes, tenant: str = "") -> CachedEmbedding | None:
        return await self.get_at(self.key(digest, tenant))

    async def get_at(self, key: bytes) -> CachedEmbedding | None:
        """The entry at Redis key ``key`` (from :meth:`key` or :meth:`put_key`); None if absent or unusable."""
        try:
            value = await self.execute(lambda r: r.get(key))
            if value is None:
                return None
            return CachedEmbedding.from_value(value)
        except (WrongTypeKey, CorruptEntry) as exc:
            self.count_corrupt(key, exc)
            with contextlib.suppress(L2Unavailable):
                await self.execute(lambda r: r.delete(key))
            return None
        except L2Unavailable:
            return None

    def count_corrupt(self, key: bytes, problem: object) -> None:
        """Counts (and logs) a key whose content is not what vitcache put there; its caller replaces it."""
        self.stats.corrupt += 1
        log.warning("redis: dropping corrupt entry %s: %s", key.decode(errors="replace"), problem)

    async def put(self, digest: bytes, entry: CachedEmbedding, tenant: str = "") -> bool:
        return await self.put_at(self.key(digest, tenant), entry)

    async def put_at(self, key: bytes, entry: CachedEmbedding) -> bool:
        """Stores ``entry`` at Redis key ``key``; False if Redis is unavailable."""
        value = entry.to_value()
        try:
            await self.execute(lambda r: r.set(key, value, ex=self._ttl_s))
        except L2Unavailable:
            return False
        return True

    async def close(self) -> None:
        await self._client.aclose()
