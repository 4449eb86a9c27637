"""The shared L1: entries' bytes live in one sealed memfd that shm clients map read-only and copy out of.

Real server in a thread, real Unix socket and memfd; entries are put into its L1 directly (a hit never
runs the tower) or computed by the tiny tower.
"""

from __future__ import annotations

import errno
import gc
import mmap
import os
import socket
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from vitcache.client import ConnectOptions, VitCacheClient
from vitcache.client.shm import ShmChannel, copied_out

from vitcache.cache.arena import ArenaEntry, SharedArena
from vitcache.cache.entry import CachedEmbedding
from vitcache.cache.l1 import L1Cache
from vitcache.config import VitcacheConfig
from vitcache.digest import digest_file
from vitcache.outcomes import Source
from vitcache.wire.shm_protocol import GENERATION, json_frame, request_frame

from .conftest import png_bytes
from .test_shm import read_reply, refusals

ABORTED = grpc.StatusCode.ABORTED.value[0]


def entry(seed: int, tokens: int = 64) -> CachedEmbedding:
    generator = torch.Generator().manual_seed(seed)
    merged = torch.randn(tokens, 256, generator=generator).to(torch.bfloat16)
    return CachedEmbedding.from_tensors((1, 16, 16), [merged, torch.randn(tokens, 8, generator=generator)])


def payload(tensors: list[torch.Tensor]) -> list[bytes]:
    return [t.contiguous().view(torch.uint8).numpy().tobytes() for t in tensors]


def shared_connection(path: Path) -> tuple[socket.socket, dict[str, Any], int]:
    """A hand-made connection that asks for the shared L1: (socket, welcome, its one fd)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(path))
    sock.sendall(json_frame({"metadata": [], "shared_l1": True}))
    data, fds, _, _ = socket.recv_fds(sock, 4096, 1)
    (fd,) = fds
    return sock, read_reply(sock, data), fd


#: How the kernel refuses each of ``write_refusals``' attempts on a sealed memfd handed over read-only.
WRITES_REFUSED = {
    "map writable": errno.EACCES,
    "write": errno.EBADF,
    "shrink": errno.EINVAL,
    "map writable, reopened": errno.EPERM,
    "write, reopened": errno.EPERM,
    "shrink, reopened": errno.EPERM,
    "grow, reopened": errno.EPERM,
}


def write_refusals(fd: int, size: int) -> dict[str, int | None]:
    """The errno of each way a client might try to change the memfd of read-only ``fd`` (``size`` bytes)."""
    attempts = {
        "map writable": lambda: mmap.mmap(fd, size),
        "write": lambda: os.write(fd, b"x"),
        "shrink": lambda: os.ftruncate(fd, 0),
    }
    reopened = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)  # the memfd's inode again, asked writable
    attempts |= {
        "map writable, reopened": lambda: mmap.mmap(reopened, size),
        "write, reopened": lambda: os.write(reopened, b"x"),
        "shrink, reopened": lambda: os.ftruncate(reopened, 0),
        "grow, reopened": lambda: os.ftruncate(reopened, 2 * size),
    }
    try:
        return refusals(attempts)
    finally:
        os.close(reopened)


def test_shared_l1_hits_equal_grpc_and_the_server_copies_nothing(start_server_thread, encoder, socket_path) -> None:  # type: ignore[no-untyped-def]
    server = start_server_thread(VitcacheConfig.of(shm_socket=str(socket_path)), encoder)
    images = [png_bytes(64, 48, 1), png_bytes(48, 64, 2)]
    with VitCacheClient(server.target) as plain:
        digests = [r.raise_for_error().digest for r in plain.encode(images)]
        over_grpc = plain.fetch(digests)
    arena = server.engine.l1.arena
    with VitCacheClient(server.target, shm_socket=socket_path) as client:
        assert client._shm is not None and client._shm.shared_l1
        over_shm = client.fetch([*digests, b"\x00" * 16])
        for got, want in zip(over_shm, over_grpc, strict=False):
            assert got.raise_for_error().source == "L1" and got.grid_thw == want.grid_thw
            assert payload(got.embeddings) == payload(want.embeddings)
            cached = server.engine.l1.get(got.digest)
            assert isinstance(cached, ArenaEntry)  # the L1's bytes are the arena's: the reply names them
            assert all(out.data.obj is arena._map for out in cached.outputs)
        assert over_shm[2].error is not None and over_shm[2].error.code is grpc.StatusCode.NOT_FOUND
        assert server.running.shm.leased_bytes == 0  # no per-connection arena, nothing copied into one
        over_shm[0].embeddings[0].add_(1)  # the caller's own copy: the cache is untouched
        again = client.fetch(digests[:1])[0]
        assert payload(again.embeddings) == payload(over_grpc[0].embeddings)


def test_an_entry_replaced_while_a_client_reads_it_is_detected_never_torn(start_server_thread, socket_path) -> None:  # type: ignore[no-untyped-def]
    server = start_server_thread(VitcacheConfig.of(shm_socket=str(socket_path), l1_bytes=4 << 20))
    l1 = server.engine.l1
    digest, old, new = digest_file(b"replaced"), entry(1), entry(2)
    l1.put(digest, old)
    sock, welcome, fd = shared_connection(socket_path)
    with sock:
        mapping = memoryview(mmap.mmap(fd, welcome["arena_bytes"], prot=mmap.PROT_READ))
        os.close(fd)
        sock.sendall(request_frame([digest], []))
        (located,) = read_reply(sock)["results"]
        assert payload(copied_out(mapping, located)) == payload(old.tensors())
        l1.put(digest, new)  # the old entry is dropped; nothing in the server views its block any more
        gc.collect()
        l1.put(digest_file(b"filler"), entry(3))  # reuses the freed block
        start, nbytes = located["outputs"][0][2:]
        assert bytes(mapping[start : start + nbytes]) != payload(old.tensors())[0]  # overwritten under the reader
        assert GENERATION.unpack_from(mapping, located["at"])[0] != located["generation"]
        assert copied_out(mapping, located) is None

    class ReplacedAfterEachAnswer(ShmChannel):
        """The entry changes between the server's answer and the copy, ``replacements`` times."""

        replacements = 0

        def _request(self, digests, releases):  # type: ignore[no-untyped-def]
            replies = super()._request(digests, releases)
            if self.replacements:
                self.replacements -= 1
                l1.put(digest, entry(10 + self.replacements))
                gc.collect()
            return replies

    channel = ReplacedAfterEachAnswer(socket_path, shared_index=False)  # the round trip: the index would answer
    try:
        channel.replacements = 1  # read again: the second answer names the replacement, which holds
        (result,) = channel.fetch([digest])
        assert result.error is None and payload(result.embeddings) == payload(entry(10).tensors())
        channel.replacements = 3  # replaced after every answer: ABORTED, no bytes
        (result,) = channel.fetch([digest])
        assert result.error is not None and result.error[0] == ABORTED and result.embeddings == []
    finally:
        channel.close()
    with VitCacheClient(server.target, shm_socket=socket_path) as client:
        (fetched,) = client.fetch([digest])
        assert payload(fetched.raise_for_error().embeddings) == payload(entry(10).tensors())


def test_a_client_cannot_write_the_shared_l1(start_server_thread, socket_path) -> None:  # type: ignore[no-untyped-def]
    server = start_server_thread(VitcacheConfig.of(shm_socket=str(socket_path)))
    digest, cached = digest_file(b"kept"), entry(4)
    server.engine.l1.put(digest, cached)
    sock, welcome, fd = shared_connection(socket_path)
    with sock:
        refused = write_refusals(fd, welcome["arena_bytes"])
        os.close(fd)
        assert refused == WRITES_REFUSED
        sock.sendall(request_frame([digest], []))
        assert read_reply(sock)["results"][0]["generation"] > 0
        sock.sendall(request_frame([digest], [64]))  # a lease to release: there are none on the shared L1
        reply = read_reply(sock)
        assert reply["error"][0] == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "0 leases held" in reply["error"][1]
        assert sock.recv(100) == b""  # that connection alone ends
    with VitCacheClient(server.target, shm_socket=socket_path) as client:
        (fetched,) = client.fetch([digest])
        assert payload(fetched.raise_for_error().embeddings) == payload(cached.tensors())


@pytest.mark.parametrize("bound", [True, False], ids=["tenant-bound tokens", "unbound tokens"])
def test_the_shared_l1_is_offered_only_where_tenants_are_no_boundary(  # type: ignore[no-untyped-def]
    start_server_thread, encoder, socket_path, tmp_path, bound: bool
) -> None:
    """The mapping holds every tenant's entries, so a server whose tokens bind tenants gives each connection
    its own arena instead; with unbound tokens any caller may act as any tenant and the mapping shows nothing
    it could not fetch."""
    tokens = tmp_path / "tokens"
    tokens.write_text("token-a tenant-a\ntoken-b tenant-b\n" if bound else "token-a\ntoken-b\n")
    server = start_server_thread(VitcacheConfig.of(shm_socket=str(socket_path), auth_token_file=str(tokens)), encoder)
    as_a = ConnectOptions(auth_token="token-a", tenant="" if bound else "tenant-a")
    as_b = ConnectOptions(auth_token="token-b", tenant="" if bound else "tenant-b")
    with VitCacheClient(server.target, options=as_a, shm_socket=socket_path) as client:
        assert client._shm is not None and client._shm.shared_l1 is not bound
        (computed,) = client.encode([png_bytes(48, 48, 5)])
        assert client.fetch([computed.digest])[0].raise_for_error().source == "L1"
    with VitCacheClient(server.target, options=as_b, shm_socket=socket_path) as client:
        (other,) = client.fetch([computed.digest])
        assert other.error is not None and other.error.code is grpc.StatusCode.NOT_FOUND


def test_l1_entries_live_in_the_arena_and_blocks_come_back_once_unviewed() -> None:
    arena = SharedArena(1 << 20)
    l1 = L1Cache(3 * entry(0).nbytes, arena)
    l1.put(0, entry(0))
    held = l1.get(0)
    for i in (1, 2):
        l1.put(i, entry(i))
    assert isinstance(held, ArenaEntry) and payload(held.tensors()) == payload(entry(0).tensors())
    used = arena.leased_bytes
    l1.put(3, entry(3))  # evicts entry 0, which `held` still views: its block stays leased
    assert l1.get(0) is None and l1.evictions == 1
    assert GENERATION.unpack_from(arena._view, held.at)[0] % 2 == 1  # marked dropped at once
    assert arena.leased_bytes == used + used // 3
    assert payload(held.tensors()) == payload(entry(0).tensors())  # and its bytes are intact
    del held
    gc.collect()
    assert arena.leased_bytes == used


def test_an_l2_hit_is_read_from_its_copy_in_the_shared_l1(start_server_thread, socket_path, redis_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server_thread(VitcacheConfig.of(shm_socket=str(socket_path), redis_url=redis_server.url))
    digest, stored = digest_file(b"in redis"), entry(6)
    assert server.call(server.engine.l2.put(digest, stored))
    channel = ShmChannel(socket_path)
    try:
        (result,) = channel.fetch([digest])  # not RESOURCE_EXHAUSTED, which would send it over gRPC again
        assert result.error is None and result.source == int(Source.L2)
        assert payload(result.embeddings) == payload(stored.tensors())
    finally:
        channel.close()


def test_an_entry_dying_while_the_arena_is_locked_gives_its_block_back_later() -> None:
    """The last reference to an entry can go anywhere, even inside the arena's own lock (garbage
    collection runs on any allocation): taking the lock again there would deadlock the server."""
    arena = SharedArena(1 << 20)
    held = [arena.store(entry(7))]

    def drop_inside_the_lock() -> None:
        with arena._lock:
            held.clear()

    worker = threading.Thread(target=drop_inside_the_lock, daemon=True)
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "deadlocked"
    assert arena.leased_bytes == 0
