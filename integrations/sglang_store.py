"""``VitcacheEmbeddingStore``: SGLang encoder servers' global embedding cache kept in vitcache.

SGLang's factory builds the backend without arguments, so it is configured by environment variables:
``VITCACHE_CLIENT_TARGET`` (host:port, required), and as for the client ``VITCACHE_CLIENT_TLS_CA``,
``VITCACHE_CLIENT_TLS_CERT``, ``VITCACHE_CLIENT_TLS_KEY``, ``VITCACHE_CLIENT_AUTH_TOKEN_FILE``,
``VITCACHE_CLIENT_TENANT`` and ``VITCACHE_CLIENT_TIMEOUT_S`` (default 5). The ``CLIENT_`` prefix keeps them apart
from ``vitcache serve``'s own ``VITCACHE_<FLAG>`` variables, so one host can run both.
Entries are stored with Put under ``sglang:<mm_hash>``, in vitcache's key space for caller-computed
embeddings, as the raw bytes of SGLang's pool pages viewed in the pool's dtype; Fetch by key brings them back
byte for byte. A vitcache that cannot be reached reads as misses and failed puts (logged), never as an error in
SGLang's request path. This module is loaded by SGLang's factory, inside SGLang (it imports sglang).
"""

from __future__ import annotations

import ctypes
import logging
import os

import grpc
import torch
from sglang.srt.mem_cache.embedding_store import EmbeddingStore
from vitcache.client import ConnectOptions, VitCacheClient

logger = logging.getLogger(__name__)


def _options_from_env() -> ConnectOptions:
    env = os.environ.get
    return ConnectOptions.from_files(
        tls_ca=env("VITCACHE_CLIENT_TLS_CA"),
        tls_cert=env("VITCACHE_CLIENT_TLS_CERT"),
        tls_key=env("VITCACHE_CLIENT_TLS_KEY"),
        auth_token_file=env("VITCACHE_CLIENT_AUTH_TOKEN_FILE"),
        tenant=env("VITCACHE_CLIENT_TENANT") or None,
    )


def _host_bytes(ptr: int, size: int) -> torch.Tensor:
    """The ``size`` bytes at host address ``ptr`` (a page of SGLang's pinned pool), as a uint8 tensor, no copy."""
    return torch.frombuffer((ctypes.c_char * size).from_address(ptr), dtype=torch.uint8)


class VitcacheEmbeddingStore(EmbeddingStore):
    def __init__(self, target: str | None = None, options: ConnectOptions | None = None) -> None:
        target = target or os.environ.get("VITCACHE_CLIENT_TARGET")
        if not target:
            raise ValueError(
                "--mm-global-cache-backend vitcache needs VITCACHE_CLIENT_TARGET=host:port of a vitcache server"
            )
        self._target = target
        self._timeout = float(os.environ.get("VITCACHE_CLIENT_TIMEOUT_S", "5"))
        self._client = VitCacheClient(target, options=options or _options_from_env())
        # What SGLang's EmbeddingCacheController pools default to; register_buffer tells the real one.
        self._dtype = torch.float32

    def register_buffer(self, tensor: torch.Tensor) -> None:
        self._dtype = tensor.dtype

    def get_key(self, mm_hash: str) -> str:
        return f"sglang:{mm_hash}"

    def _unreachable(self, what: str, error: grpc.RpcError, count: int) -> list[bool]:
        logger.warning("vitcache %s at %s failed (%s: %s)", what, self._target, error.code().name, error.details())
        return [False] * count

    def batch_is_exist(self, hashes: list[str]) -> list[bool]:
        try:
            results = self._client.fetch(
                keys=[self.get_key(h) for h in hashes], metadata_only=True, timeout=self._timeout
            )
        except grpc.RpcError as error:
            return self._unreachable("existence check", error, len(hashes))
        return [result.ok for result in results]

    def batch_get(self, hashes: list[str], ptrs: list[int], sizes: list[int]) -> list[bool]:
        return self.batch_get_into_multi_buffers(hashes, [[p] for p in ptrs], [[s] for s in sizes])

    def batch_put(self, hashes: list[str], ptrs: list[int], sizes: list[int]) -> list[bool]:
        return self.batch_put_from_multi_buffers(hashes, [[p] for p in ptrs], [[s] for s in sizes])

    def batch_get_into_multi_buffers(
        self, hashes: list[str], ptrs: list[list[int]], sizes: list[list[int]]
    ) -> list[bool]:
        try:
            results = self._client.fetch(keys=[self.get_key(h) for h in hashes], timeout=self._timeout)
        except grpc.RpcError as error:
            return self._unreachable("fetch", error, len(hashes))
        loaded = []
        for result, page_ptrs, page_sizes in zip(results, ptrs, sizes, strict=True):
            if not result.ok or len(result.embeddings) != 1:
                loaded.append(False)
                continue
            stored = result.embeddings[0].contiguous().view(torch.uint8).reshape(-1)
            if stored.numel() != sum(page_sizes):
                logger.warning(
                    "%s: vitcache holds %d bytes, SGLang expects %d", result.key, stored.numel(), sum(page_sizes)
                )
                loaded.append(False)
                continue
            offset = 0
            for ptr, size in zip(page_ptrs, page_sizes, strict=True):
                _host_bytes(ptr, size).copy_(stored[offset : offset + size])
                offset += size
            loaded.append(True)
        return loaded

    def batch_put_from_multi_buffers(
        self, hashes: list[str], ptrs: list[list[int]], sizes: list[list[int]]
    ) -> list[bool]:
        element = torch.empty((), dtype=self._dtype).element_size()
        items, positions = [], []
        for index, (mm_hash, page_ptrs, page_sizes) in enumerate(zip(hashes, ptrs, sizes, strict=True)):
            if sum(page_sizes) % element:
                logger.warning("embedding %s: %d bytes are not whole %s values", mm_hash, sum(page_sizes), self._dtype)
                continue
            pages = [_host_bytes(ptr, size) for ptr, size in zip(page_ptrs, page_sizes, strict=True)]
            data = pages[0] if len(pages) == 1 else torch.cat(pages)
            items.append((self.get_key(mm_hash), [data.view(self._dtype)]))
            positions.append(index)
        stored = [False] * len(hashes)
        if not items:
            return stored
        try:
            failures = self._client.put(items, timeout=self._timeout)
        except grpc.RpcError as error:
            return self._unreachable("put", error, len(hashes))
        for index, failure in zip(positions, failures, strict=True):
            if failure is not None:
                logger.warning("vitcache put of %s failed: %s", hashes[index], failure)
            stored[index] = failure is None
        return stored
