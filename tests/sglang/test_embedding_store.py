"""The vitcache EmbeddingStore backend, loaded the way SGLang 0.5.23 loads it, against a real vitcache server."""

from __future__ import annotations

import socket
import uuid

import pytest
import torch
from sglang.srt.mem_cache.embedding_store import EmbeddingStoreFactory
from sglang.srt.plugins import load_plugins
from sglang.srt.server_args import prepare_server_args
from vitcache.client import VitCacheClient


def pages(pool: torch.Tensor, *rows: int) -> tuple[list[int], list[int]]:
    """Pointers and byte sizes of pool rows, as SGLang's cache controller hands them to the store."""
    return [pool[row].data_ptr() for row in rows], [pool[row].nbytes for row in rows]


@pytest.fixture
def store(vitcache_targets, monkeypatch):  # type: ignore[no-untyped-def]
    load_plugins()  # SGLang's plugin loading runs vitcache's entry point, which registers the backend
    monkeypatch.setenv("VITCACHE_CLIENT_TARGET", vitcache_targets["qwen2_vl"])
    return EmbeddingStoreFactory.create_backend("vitcache")


def test_plugin_lets_sglangs_command_line_choose_vitcache(store):
    args = ["--model-path", "unused", "--enable-mm-global-cache", "--mm-global-cache-backend", "vitcache"]
    assert prepare_server_args(args).mm_global_cache_backend == "vitcache"
    assert type(store).__module__ == "vitcache.integrations.sglang_store"


def test_put_get_exists_round_trip(store, vitcache_targets):
    pool = torch.randn(4, 48, dtype=torch.bfloat16)  # SGLang's pinned pool: pages of rows in the model dtype
    store.register_buffer(pool)
    paged, single = uuid.uuid4().hex, uuid.uuid4().hex
    assert store.batch_is_exist([paged, single]) == [False, False]

    ptrs, sizes = pages(pool, 0, 2)
    assert store.batch_put_from_multi_buffers([paged], [ptrs], [sizes]) == [True]
    ptrs, sizes = pages(pool, 1)
    assert store.batch_put([single], ptrs, sizes) == [True]
    assert store.batch_is_exist([paged, single, uuid.uuid4().hex]) == [True, True, False]

    # vitcache holds the pages' bytes in the pool's dtype, under SGLang's key.
    with VitCacheClient(vitcache_targets["qwen2_vl"]) as client:
        (entry,) = client.fetch(keys=[store.get_key(paged)])
    assert torch.equal(entry.raise_for_error().embeddings[0], torch.cat([pool[0], pool[2]]))

    into = torch.zeros_like(pool)
    ptrs, sizes = pages(into, 3, 1)
    assert store.batch_get_into_multi_buffers([paged], [ptrs], [sizes]) == [True]
    assert torch.equal(into[3], pool[0]) and torch.equal(into[1], pool[2])
    ptrs, sizes = pages(into, 0)
    assert store.batch_get([single], ptrs, sizes) == [True]
    assert torch.equal(into[0], pool[1])

    # An entry that does not fit the pages SGLang offers, or is missing, is a miss that writes nothing.
    into.zero_()
    ptrs, sizes = pages(into, 0)
    assert store.batch_get([paged, uuid.uuid4().hex], ptrs * 2, sizes * 2) == [False, False]
    assert not into.any()


def test_unreachable_vitcache_reads_as_misses(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    load_plugins()
    monkeypatch.setenv("VITCACHE_CLIENT_TARGET", closed)
    monkeypatch.setenv("VITCACHE_CLIENT_TIMEOUT_S", "2")
    store = EmbeddingStoreFactory.create_backend("vitcache")
    pool = torch.ones(2, 8)
    ptrs, sizes = pages(pool, 0)
    assert store.batch_is_exist(["a"]) == [False]
    assert store.batch_put(["a"], ptrs, sizes) == [False]
    assert store.batch_get(["a"], ptrs, sizes) == [False]


def test_missing_target_says_what_to_set(monkeypatch):
    load_plugins()
    monkeypatch.delenv("VITCACHE_CLIENT_TARGET", raising=False)
    with pytest.raises(ValueError, match="VITCACHE_CLIENT_TARGET=host:port"):
        EmbeddingStoreFactory.create_backend("vitcache")
