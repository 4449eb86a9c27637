"""The shared L1's index: same-host clients find hits themselves, with no round trip, and report them.

Real server in a thread, real Unix socket and memfds; entries are put into its L1 directly (a hit never runs the
tower). Races are driven by hooks between the client's lookup and its checks, never by timing.
"""

from __future__ import annotations

import gc
import mmap
import os
import socket
from pathlib import Path

import grpc
import pytest
from vitcache.client import ConnectOptions, VitCacheClient, shm
from vitcache.client.shm import ShmChannel

from vitcache.cache.arena import SharedArena
from vitcache.cache.entry import CachedEmbedding
from vitcache.cache.l1 import L1Cache, l1_key, l1_put_key
from vitcache.cache.shared_index import SharedIndex
from vitcache.config import VitcacheConfig
from vitcache.digest import digest_file
from vitcache.wire.shm_index import PROBES, find_slot, home_slot, index_bytes
from vitcache.wire.shm_protocol import REPORT, json_frame, report_frame, request_frame
from vitcache.wire.timing import VideoTiming

from .test_shm import read_reply, wait_until
from .test_shm_shared_l1 import WRITES_REFUSED, entry, payload, write_refusals

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]


class CountingChannel(ShmChannel):
    """Counts the requests that reach the server (round trips)."""

    requests = 0

    def _request(self, digests, releases):  # type: ignore[no-untyped-def]
        self.requests += 1
        return super()._request(digests, releases)


def serving_one_entry(start_server_thread, socket_path: Path, name: bytes, seed: int, **config):  # type: ignore[no-untyped-def]
    """A server with ``--shm-socket`` whose L1 holds ``entry(seed)`` under the digest of ``name``: (server, digest)."""
    server = start_server_thread(VitcacheConfig.of(shm_socket=str(socket_path), **config))
    digest = digest_file(name)
    server.engine.l1.put(digest, entry(seed))
    return server, digest


def hand_made_connection(path: Path, hello: dict) -> tuple[socket.socket, dict, list[int]]:
    """A connection that said ``hello``: (socket, welcome, the fds it came with)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(path))
    sock.sendall(json_frame({"metadata": []} | hello))
    data, fds, _, _ = socket.recv_fds(sock, 4096, 2)
    return sock, read_reply(sock, data), fds


def video_entry(seed: int) -> CachedEmbedding:
    timing = VideoTiming(frames=4, sampled_fps=2.0, second_per_grid_ts=1.0, timestamps=(0.25, 1.25))
    return CachedEmbedding(entry(seed).grid_thw, entry(seed).outputs, timing)


def test_index_hits_equal_grpc_fetch_and_make_no_round_trip(start_server_thread, socket_path) -> None:  # type: ignore[no-untyped-def]
    server = start_server_thread(VitcacheConfig.of(shm_socket=str(socket_path)))
    digests = [digest_file(b"image"), digest_file(b"clip")]
    server.engine.l1.put(digests[0], entry(1))
    server.engine.l1.put(digests[1], video_entry(2))
    with VitCacheClient(server.target) as plain:
        over_grpc = plain.fetch(digests)
    channel = CountingChannel(socket_path)
    try:
        assert channel.index_slots > 0
        hits = channel.fetch(digests)
        assert channel.requests == 0  # found in the index: the server was not asked
        for got, want in zip(hits, over_grpc, strict=True):
            assert got.error is None and got.source == 1 and got.grid_thw == want.grid_thw
            assert payload(got.embeddings) == payload(want.embeddings)
            assert got.video == want.video
        assert hits[1].video is not None and hits[1].video.timestamps == (0.25, 1.25)
        missing = digest_file(b"absent")
        results = channel.fetch([missing, digests[0]])
        assert channel.requests == 1  # the miss alone asked
        assert results[0].error is not None and results[0].error[0] == grpc.StatusCode.NOT_FOUND.value[0]
        assert results[1].index == 1 and payload(results[1].embeddings) == payload(over_grpc[0].embeddings)
    finally:
        channel.close()
    with VitCacheClient(server.target, shm_socket=socket_path, shm_shared_index=False) as asking:
        assert asking._shm is not None and asking._shm.shared_l1 and asking._shm.index_slots == 0
        assert payload(asking.fetch(digests[:1])[0].raise_for_error().embeddings) == payload(entry(1).tensors())


@pytest.mark.parametrize("change", ["replaced", "evicted"])
def test_an_entry_changed_between_lookup_and_check_is_not_read_from_the_index(  # type: ignore[no-untyped-def]
    start_server_thread, socket_path, change: str
) -> None:
    """The entry's block is dropped and reused for another between the client's lookup and its copy: the bytes
    it would copy are another entry's; the check after the copy sees it and the server is asked instead."""
    held = 2 if change == "replaced" else 1  # entries L1 holds: the filler evicts the replacement or the entry
    server = start_server_thread(VitcacheConfig.of(shm_socket=str(socket_path), l1_bytes=held * entry(0).nbytes))
    l1 = server.engine.l1
    digest, old = digest_file(b"changing"), entry(1)
    l1.put(digest, old)
    overwritten: list[bool] = []

    class ChangedAfterLookup(CountingChannel):
        def _locate(self, digest_):  # type: ignore[no-untyped-def]
            located = super()._locate(digest_)
            if located is not None and not overwritten:
                if change == "replaced":
                    l1.put(digest, entry(2))
                l1.put(digest_file(b"filler"), entry(3))  # reuses the dropped block, unviewed now
                gc.collect()
                start, nbytes = located["outputs"][0][2:]
                overwritten.append(bytes(self._arena[start : start + nbytes]) != payload(old.tensors())[0])
            return located

    channel = ChangedAfterLookup(socket_path)
    try:
        (result,) = channel.fetch([digest])
        assert overwritten == [True]  # a copy made now would have held foreign bytes
        assert channel.requests == 1  # not a hit from the index: asked the server
        if change == "replaced":
            assert result.error is None and payload(result.embeddings) == payload(entry(2).tensors())
        else:
            assert result.error is not None and result.error[0] == grpc.StatusCode.NOT_FOUND.value[0]
    finally:
        channel.close()


def test_index_hits_are_counted_by_the_server_and_refresh_recency(start_server_thread, socket_path) -> None:  # type: ignore[no-untyped-def]
    server = start_server_thread(VitcacheConfig.of(shm_socket=str(socket_path), l1_bytes=3 * entry(0).nbytes))
    l1, stats = server.engine.l1, server.engine.stats
    digests = [digest_file(b"entry %d" % i) for i in range(3)]
    for i, digest in enumerate(digests):
        l1.put(digest, entry(i))
    channel = CountingChannel(socket_path)
    try:
        before = stats.l1_hits
        channel.fetch([digests[0], digests[0]])  # the oldest entry, read from the index twice
        assert channel.requests == 0
        channel.fetch([digest_file(b"absent")])  # the report rides with this request, ahead of it
        assert stats.l1_hits == before + 2 and stats.not_found == 1
        registry = server.running.metrics.registry  # what /metrics and the dashboard's hit rate read
        assert registry.get_sample_value("vitcache_images_total", {"source": "l1", "code": "OK", "kind": "image"}) == 2
        assert registry.get_sample_value("vitcache_cache_lookups_total", {"tier": "l1", "result": "hit"}) == 2
        l1.put(digest_file(b"newcomer"), entry(3))  # evicts the least recent: digests[1], not the one read
        assert l1.get(digests[0]) is not None and l1.get(digests[1]) is None
        channel.fetch([digests[2]])  # no request follows: the background report counts it
        assert wait_until(lambda: stats.l1_hits == before + 3)
        channel.fetch([digests[2]])
    finally:
        channel.close()  # reports the last hit
    assert wait_until(lambda: stats.l1_hits == before + 4)
    assert channel.requests == 1
    with pytest.raises(ConnectionError):  # the index could still answer, but its hits would go uncounted
        channel.fetch([digests[2]])


def test_a_caller_that_leaves_the_reporter_no_turn_reports_every_max_images_hits(  # type: ignore[no-untyped-def]
    start_server_thread, socket_path, monkeypatch
) -> None:
    server, digest = serving_one_entry(start_server_thread, socket_path, b"popular", 8, max_images_per_request=2)
    monkeypatch.setattr(shm, "REPORT_INTERVAL_S", 3600.0)  # the background reporter never gets to it
    channel = CountingChannel(socket_path)
    try:
        before = server.engine.stats.l1_hits
        channel.fetch([digest])
        assert len(channel._index_hits) == 1  # waits for a request or the reporter
        channel.fetch([digest])
        assert channel._index_hits == []  # two waiting: sent at once
        assert wait_until(lambda: server.engine.stats.l1_hits == before + 2)
        assert channel.requests == 0
    finally:
        channel.close()


def test_a_channel_whose_server_is_gone_closes_once_a_report_fails(start_server_thread, socket_path) -> None:  # type: ignore[no-untyped-def]
    """The index stays mapped after the server is gone and would go on answering hits that no one counts."""
    server, digest = serving_one_entry(start_server_thread, socket_path, b"orphaned", 9)
    channel = ShmChannel(socket_path)
    try:
        server.stop()
        assert channel.fetch([digest])[0].error is None  # from the index: the server is not asked
        assert wait_until(channel._closed.is_set)  # the background report failed
        with pytest.raises(ConnectionError):
            channel.fetch([digest])
    finally:
        channel.close()


def test_a_client_cannot_write_the_index(start_server_thread, socket_path) -> None:  # type: ignore[no-untyped-def]
    server, digest = serving_one_entry(start_server_thread, socket_path, b"kept", 4)
    sock, welcome, (arena_fd, index_fd) = hand_made_connection(socket_path, {"shared_l1": True, "shared_index": True})
    with sock:
        slots = welcome["index_slots"]
        size = index_bytes(slots)
        assert os.fstat(index_fd).st_size == size
        assert write_refusals(index_fd, size) == WRITES_REFUSED
        index = memoryview(mmap.mmap(index_fd, size, prot=mmap.PROT_READ))
        os.close(arena_fd)
        os.close(index_fd)
        assert find_slot(index, slots, digest) is not None
        with pytest.raises(TypeError):
            index[0:1] = b"x"  # the mapping is read-only
    with VitCacheClient(server.target, shm_socket=socket_path) as client:
        (fetched,) = client.fetch([digest])
        assert payload(fetched.raise_for_error().embeddings) == payload(entry(4).tensors())


@pytest.mark.parametrize(
    ("tokens", "tenant", "indexed"),
    [("token-a tenant-a\n", "", False), ("token-a\n", "tenant-a", False), ("token-a\n", "", True)],
    ids=["tenant-bound tokens", "unbound token, a tenant", "unbound token, no tenant"],
)
def test_the_index_is_offered_only_to_connections_without_a_tenant_where_tenants_are_no_boundary(  # type: ignore[no-untyped-def]
    start_server_thread, socket_path, tmp_path, tokens: str, tenant: str, indexed: bool
) -> None:
    """The index holds tenant-less entries only: a tenant's lookups are its own keys, which the server answers."""
    token_file = tmp_path / "tokens"
    token_file.write_text(tokens)
    server = start_server_thread(VitcacheConfig.of(shm_socket=str(socket_path), auth_token_file=str(token_file)))
    digest = digest_file(b"everyone's")
    server.engine.l1.put(digest, entry(5))
    server.engine.l1.put(l1_key(digest, "tenant-a"), entry(6))
    options = ConnectOptions(auth_token="token-a", tenant=tenant)
    channel = CountingChannel(socket_path, options.metadata())
    try:
        assert (channel.index_slots > 0) is indexed
        (result,) = channel.fetch([digest])
        want = entry(5) if indexed else entry(6)  # not indexed: the connection acts as tenant-a
        assert result.error is None and payload(result.embeddings) == payload(want.tensors())
        assert channel.requests == (0 if indexed else 1)
    finally:
        channel.close()


def test_a_report_where_no_index_was_given_ends_that_connection_alone(start_server_thread, socket_path) -> None:  # type: ignore[no-untyped-def]
    server, digest = serving_one_entry(start_server_thread, socket_path, b"reported", 7)
    before = server.engine.stats.l1_hits
    sock, welcome, fds = hand_made_connection(socket_path, {"shared_l1": True})  # no index asked for
    with sock:
        for fd in fds:
            os.close(fd)
        assert len(fds) == 1 and "index_slots" not in welcome
        sock.sendall(report_frame([digest]))
        reply = read_reply(sock)
        assert reply["error"][0] == INVALID_ARGUMENT and str(REPORT + 1) in reply["error"][1]
        assert sock.recv(100) == b""
    assert server.engine.stats.l1_hits == before  # nothing counted
    channel = ShmChannel(socket_path)
    try:
        channel._sock.sendall(report_frame([digest_file(b"never stored")]) + request_frame([digest], []))
        assert channel._read_json(b"")["results"][0]["generation"] > 0  # reports of absent digests harm nothing
        assert server.engine.stats.l1_hits == before + 1  # the request's own hit; the report counted nothing
    finally:
        channel.close()


def test_only_plain_digest_keys_are_indexed_and_a_full_neighbourhood_leaves_an_entry_out() -> None:
    arena = SharedArena(4 << 20)
    l1 = L1Cache(3 << 20, arena)
    digest = digest_file(b"plain")
    l1.put(digest, entry(1))
    l1.put(l1_key(digest, "tenant"), entry(2))
    l1.put(l1_put_key("key"), entry(3))
    assert len(arena.index) == 1 and find_slot(memoryview(arena.index._map), arena.index.slots, digest)

    index = SharedIndex(64)
    view = memoryview(index._map)
    same_home = [d for d in (digest_file(b"%d" % i) for i in range(5000)) if home_slot(d, 64) == 5][: PROBES + 1]
    assert [index.publish(d, 64 * i, 2) for i, d in enumerate(same_home)] == [True] * PROBES + [False]
    assert find_slot(view, 64, same_home[-1]) is None
    index.withdraw(same_home[0], 2)
    assert find_slot(view, 64, same_home[0]) is None
    assert index.publish(same_home[-1], 4096, 4)
    assert find_slot(view, 64, same_home[-1])[2:] == (4096, 4)
    index.withdraw(same_home[-1], 2)  # a stale generation: the newer entry stays
    assert find_slot(view, 64, same_home[-1]) is not None
