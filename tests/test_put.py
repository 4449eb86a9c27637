"""Put and keyed Fetch: caller-computed entries in a key space of their own (real server, real Redis)."""

from __future__ import annotations

import grpc
import pytest
import torch
from vitcache.client import ConnectOptions, VitCacheClient

from vitcache.config import VitcacheConfig

from .conftest import png_bytes


def _tensors(seed: int, rows: int = 6, width: int = 32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, width, generator=generator).to(torch.bfloat16), torch.randn(rows, 3, generator=generator)]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_put_then_fetch_by_key_returns_the_tensors_as_put_from_l1_and_from_l2(
    start_server_thread, encoder, redis_server
) -> None:  # type: ignore[no-untyped-def]
    first = start_server_thread(VitcacheConfig.of(redis_url=redis_server.url), encoder)
    stored = {"mm-hash-a": _tensors(1), "ünïcode/key:with spaces": _tensors(2)}
    with VitCacheClient(first.target) as client:
        assert client.put(stored, grid_thws=[(1, 4, 6), (1, 2, 2)]) == [None, None]
        results = client.fetch(keys=[*stored, "never-put"])
        assert [r.key for r in results] == [*stored, "never-put"]
        assert [r.source for r in results[:2]] == ["L1", "L1"]
        assert _same(results[0].embeddings, stored["mm-hash-a"])
        assert results[0].grid_thw == (1, 4, 6)
        assert _same(results[1].embeddings, stored["ünïcode/key:with spaces"])
        assert results[2].error is not None and results[2].error.code is grpc.StatusCode.NOT_FOUND
        assert client.stats().puts == 2

    # A replica sharing the Redis finds the entry in L2: the Put was written there before it returned.
    second = start_server_thread(VitcacheConfig.of(redis_url=redis_server.url), encoder)
    with VitCacheClient(second.target) as client:
        (again,) = client.fetch(keys=["mm-hash-a"])
        assert again.source == "L2" and _same(again.embeddings, stored["mm-hash-a"])


def test_put_keys_never_reach_entries_computed_from_image_bytes(start_server_thread, encoder, redis_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server_thread(VitcacheConfig.of(redis_url=redis_server.url), encoder)
    with VitCacheClient(server.target) as client:
        (computed,) = client.encode([png_bytes(40, 40, 7)])
        computed.raise_for_error()
        # An external writer that knows the digest puts something else under it, as text and as raw bytes.
        impostor = [torch.zeros_like(t) for t in computed.embeddings]
        assert client.put([(computed.digest.hex(), impostor), (computed.digest.decode("latin-1"), impostor)]) == [
            None,
            None,
        ]
        (by_digest,) = client.fetch([computed.digest])
        assert _same(by_digest.embeddings, computed.embeddings)
        (by_key,) = client.fetch(keys=[computed.digest.hex()])
        assert _same(by_key.embeddings, impostor)
    redis_keys = sorted(redis_server.client().keys())
    assert len(redis_keys) == 3
    assert sum(k.startswith(b"vitcache:v1:") for k in redis_keys) == 1  # the computed entry's key space
    assert sum(k.startswith(b"vitcache:put:v1:") for k in redis_keys) == 2


def test_metadata_only_fetch_answers_existence_without_embeddings(start_server_thread, encoder) -> None:  # type: ignore[no-untyped-def]
    server = start_server_thread(VitcacheConfig.of(), encoder)
    with VitCacheClient(server.target) as client:
        (computed,) = client.encode([png_bytes(32, 32, 3)])
        assert client.put({"k": _tensors(3)}, grid_thws=[(1, 2, 3)]) == [None]
        results = client.fetch([computed.digest], keys=["k", "absent"], metadata_only=True)
        assert [(r.index, r.source, r.embeddings) for r in results[:2]] == [(0, "L1", []), (1, "L1", [])]
        assert results[0].grid_thw == computed.grid_thw and results[1].grid_thw == (1, 2, 3)
        assert results[2].error is not None and results[2].error.code is grpc.StatusCode.NOT_FOUND


def test_bad_put_items_fail_alone(start_server_thread, encoder) -> None:  # type: ignore[no-untyped-def]
    server = start_server_thread(VitcacheConfig.of(max_put_bytes=4096), encoder)
    good = _tensors(4)
    with VitCacheClient(server.target) as client:
        errors = client.put(
            [
                ("ok", good),
                ("", good),  # empty key
                ("x" * 257, good),  # key too long
                ("big", [torch.zeros(64, 64)]),  # 16 KiB > --max-put-bytes
                ("ints", [torch.zeros(4, dtype=torch.int64)]),
                ("none", []),
                ("ok2", good),
            ]
        )
        codes = [e.code if e else None for e in errors]
        assert codes == [
            None,
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.INVALID_ARGUMENT,
            None,
        ]
        assert "max-put-bytes" in errors[3].message  # type: ignore[union-attr]
        # A tensor whose bytes do not match its shape, and a grid of two values, sent past the client's helpers.
        from vitcache.v1 import vitcache_pb2 as pb
        from vitcache.v1 import vitcache_pb2_grpc as pb_grpc

        stub = pb_grpc.VitCacheStub(grpc.insecure_channel(server.target))
        bad_shape = pb.PutItem(key="s", embeddings=[pb.Tensor(dtype="float32", shape=[3, 3], data=b"\0" * 8)])
        bad_grid = pb.PutItem(
            key="g", grid_thw=[1, 2], embeddings=[pb.Tensor(dtype="float32", shape=[2], data=b"\0" * 8)]
        )
        response = stub.Put(pb.PutRequest(items=[bad_shape, bad_grid]))
        assert [r.error_code for r in response.results] == [grpc.StatusCode.INVALID_ARGUMENT.value[0]] * 2
        fetched = client.fetch(keys=["ok", "ok2", "s", "g"])
        assert [r.ok for r in fetched] == [True, True, False, False]


@pytest.fixture
def tokens(tmp_path):  # type: ignore[no-untyped-def]
    path = tmp_path / "tokens"
    path.write_text("token-a tenant-a\ntoken-b tenant-b\n")
    return path


def test_put_entries_are_scoped_to_the_tenant(start_server_thread, encoder, redis_server, tmp_path, tokens) -> None:  # type: ignore[no-untyped-def]
    server = start_server_thread(VitcacheConfig.of(redis_url=redis_server.url, auth_token_file=str(tokens)), encoder)
    (tmp_path / "a").write_text("token-a")
    (tmp_path / "b").write_text("token-b")
    a = ConnectOptions.from_files(None, None, None, str(tmp_path / "a"))
    b = ConnectOptions.from_files(None, None, None, str(tmp_path / "b"))
    with VitCacheClient(server.target, options=a) as alice, VitCacheClient(server.target, options=b) as bob:
        assert alice.put({"shared-name": _tensors(5)}) == [None]
        (missing,) = bob.fetch(keys=["shared-name"])
        assert missing.error is not None and missing.error.code is grpc.StatusCode.NOT_FOUND
        assert bob.put({"shared-name": _tensors(6)}) == [None]
        (mine,) = alice.fetch(keys=["shared-name"])
        assert _same(mine.embeddings, _tensors(5))
    with VitCacheClient(server.target) as anonymous, pytest.raises(grpc.RpcError) as denied:
        anonymous.put({"x": _tensors(7)})
    assert denied.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_async_client_puts_and_fetches_by_key(start_server_thread, encoder) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    from vitcache.client import AsyncVitCacheClient

    server = start_server_thread(VitcacheConfig.of(), encoder)

    async def roundtrip() -> list:
        async with AsyncVitCacheClient(server.target) as client:
            assert await client.put([("async-key", _tensors(8))]) == [None]
            return await client.fetch(keys=["async-key"])

    (result,) = asyncio.run(roundtrip())
    assert result.key == "async-key" and _same(result.embeddings, _tensors(8))


def test_fetch_and_put_of_more_than_a_request_holds_go_in_several(start_server_thread, encoder) -> None:  # type: ignore[no-untyped-def]
    """The server takes 256 items a request (--max-images-per-request); the client sends more in several,
    keeping every result at its index across the requests."""
    server = start_server_thread(VitcacheConfig.of(), encoder)
    stored = {f"k{i}": [torch.full((1, 2), float(i))] for i in range(300)}
    with VitCacheClient(server.target) as client:
        assert client.put(stored) == [None] * 300
        computed = [r.raise_for_error() for r in client.encode([png_bytes(32, 32, 1), png_bytes(32, 32, 2)])]
        digests = [computed[i % 2].digest for i in range(300)]
        results = client.fetch(digests, keys=[*stored, "absent"])
    assert [r.index for r in results] == list(range(601))
    assert all(r.digest == digests[i] and r.source == "L1" for i, r in enumerate(results[:300]))
    assert [r.key for r in results[300:]] == [*stored, "absent"]
    assert all(r.embeddings[0][0, 0].item() == i for i, r in enumerate(results[300:600]))
    assert results[600].error is not None and results[600].error.index == 600


def test_a_put_stored_nowhere_says_so(start_server_thread, encoder, redis_server) -> None:  # type: ignore[no-untyped-def]
    """An entry larger than L1 is stored only if Redis takes it; with no Redis the Put fails, not "stored"."""
    big = {"big": [torch.zeros(64, 64)]}  # 16 KiB, over a 4 KiB L1
    alone = start_server_thread(VitcacheConfig.of(l1_bytes=4096), encoder)
    with VitCacheClient(alone.target) as client:
        (error,) = client.put(big)
        assert error is not None and error.code is grpc.StatusCode.RESOURCE_EXHAUSTED and "--l1-bytes" in error.message
        assert client.stats().puts == 0
    shared = start_server_thread(VitcacheConfig.of(l1_bytes=4096, redis_url=redis_server.url), encoder)
    with VitCacheClient(shared.target) as client:
        assert client.put(big) == [None]
        assert client.fetch(keys=["big"])[0].source == "L2"
