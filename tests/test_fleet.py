"""Several replicas sharing one L2: fleet-wide single flight, affinity routing, failover, Redis faults."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import torch
from vitcache.client import FleetClient, VitCacheClient
from vitcache.client.fleet import rendezvous_order

from vitcache.config import VitcacheConfig
from vitcache.digest import digest_file

from .conftest import ServeProcess, png_bytes


def test_rendezvous_order_is_stable_and_moves_only_the_removed_replicas_images() -> None:
    targets = ["127.0.0.1:50051", "127.0.0.1:50052", "127.0.0.1:50053"]  # names only; nothing is called
    digests = [digest_file(i.to_bytes(4, "big")) for i in range(300)]
    owners = [targets[rendezvous_order(d, targets)[0]] for d in digests]
    assert {t: owners.count(t) for t in targets}.keys() == set(targets)
    assert all(60 < owners.count(t) < 140 for t in targets)  # roughly even
    survivors = [targets[0], targets[2]]
    for digest, owner in zip(digests, owners, strict=True):
        new_owner = survivors[rendezvous_order(digest, survivors)[0]]
        if owner != targets[1]:
            assert new_owner == owner  # only the removed replica's images move
        else:  # ... to the replica that was their second choice
            assert new_owner == targets[rendezvous_order(digest, targets)[1]]


def _lock_config(redis_url: str, **kwargs) -> VitcacheConfig:  # type: ignore[no-untyped-def]
    # The batch waits 0.5 s to fill, so the holder keeps the lock long enough for the other to arrive.
    return VitcacheConfig.of(redis_url=redis_url, max_batch_wait_s=0.5, **kwargs)


def test_the_same_image_sent_to_two_replicas_at_once_is_computed_once(
    start_server_thread, encoder, redis_server
) -> None:  # type: ignore[no-untyped-def]
    replicas = [start_server_thread(_lock_config(redis_server.url), encoder) for _ in range(2)]
    image = png_bytes(112, 112, 600)
    start = threading.Barrier(2)
    results: list = [None, None]

    def send(i: int) -> None:
        with VitCacheClient(replicas[i].target) as client:
            start.wait(timeout=10)
            results[i] = client.encode([image], timeout=30)[0]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(r is not None and r.ok for r in results)
    stats = [VitCacheClient(r.target).stats() for r in replicas]
    assert sum(s.images_computed for s in stats) == 1  # once in the whole fleet
    assert sum(s.fleet_lock_waits for s in stats) == 1  # the other replica waited for it
    assert sorted(r.source for r in results) == ["COMPUTED", "L2"]
    assert results[0].embeddings[0].numpy().tobytes() == results[1].embeddings[0].numpy().tobytes()
    assert not redis_server.client().keys("*:lock")  # released


def test_a_dead_holders_lock_delays_but_never_blocks(start_server_thread, encoder, redis_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server_thread(VitcacheConfig.of(redis_url=redis_server.url, fleet_lock_ttl_s=5.0), encoder)
    image = png_bytes(56, 56, 610)
    lock_key = f"vitcache:v1:{encoder.namespace}:{digest_file(image).hex()}:lock"
    redis_server.client().set(lock_key, "token-of-a-replica-that-died", px=700)  # as a dead holder leaves it
    with VitCacheClient(srv.target) as client:
        result = client.encode([image], timeout=30)[0].raise_for_error()
        stats = client.stats()
    assert result.source == "COMPUTED" and stats.fleet_lock_waits == 1 and stats.images_computed == 1


def test_a_holder_whose_l2_write_fails_still_releases_its_lock(start_server_thread, encoder, redis_server) -> None:  # type: ignore[no-untyped-def]
    # A failed write sets the tier backing off; the release must go out all the same, or the other
    # replicas' misses of this image wait out the lock's 60 s lifetime.
    srv = start_server_thread(_lock_config(redis_server.url, fleet_lock_ttl_s=60.0), encoder)
    image = png_bytes(56, 56, 620)
    lock_key = f"vitcache:v1:{encoder.namespace}:{digest_file(image).hex()}:lock"
    redis = redis_server.client()
    with VitCacheClient(srv.target) as client:
        results: list = []
        sent = threading.Thread(target=lambda: results.extend(client.encode([image], timeout=30)))
        sent.start()
        _wait_for(lambda: redis.exists(lock_key))  # taken; the batch waits 0.5 s to fill
        redis.config_set("maxmemory", 1)  # the value's SET is refused (OOM); the lock's DEL is not
        try:
            sent.join(30)
            srv.call(srv.engine.drain())
        finally:
            redis.config_set("maxmemory", 0)
        stats = client.stats()
    assert [r.source for r in results] == ["COMPUTED"]
    assert stats.images_computed == 1 and stats.l2_errors >= 1  # the write failed
    assert not redis.exists(lock_key)


def test_redis_killed_and_restarted_under_load_fails_no_request(start_server_thread, encoder, own_redis) -> None:  # type: ignore[no-untyped-def]
    srv = start_server_thread(VitcacheConfig.of(redis_url=own_redis.url, redis_timeout_s=0.2), encoder)
    images = [png_bytes(56, 56, 700 + i) for i in range(16)]
    done, failures = [0, 0, 0], []  # requests finished per worker

    def load(worker: int) -> None:
        with VitCacheClient(srv.target) as client:
            for n in range(40):  # bounded in count; every call bounded in time
                batch = [images[(worker * 5 + n + k) % len(images)] for k in range(2)]
                failures.extend(r.error for r in client.encode(batch, timeout=30) if not r.ok)
                done[worker] += 1

    workers = [threading.Thread(target=load, args=(w,)) for w in range(3)]
    for worker in workers:
        worker.start()
    _wait_for(lambda: sum(done) >= 10)
    own_redis.kill()
    _wait_for(lambda: sum(done) >= 40)
    own_redis.start()  # same port, empty
    for worker in workers:
        worker.join(timeout=120)
    assert not failures and sum(done) == 120
    with VitCacheClient(srv.target) as client:
        for attempt in range(50):
            assert client.encode([png_bytes(84, 56, 800 + attempt)])[0].ok
            if client.stats().redis_connected:
                break
            time.sleep(0.1)
        stats = client.stats()
    assert stats.redis_connected and stats.l2_errors >= 1
    srv.call(srv.engine.drain())
    assert own_redis.client().dbsize() >= 1  # writes flow again


def _wait_for(condition, timeout_s: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def fleet(tiny_checkpoint, redis_server, tmp_path) -> Iterator[list[ServeProcess]]:  # type: ignore[no-untyped-def]
    flags = ["--model", str(tiny_checkpoint), "--redis-url", redis_server.url]
    replicas = [ServeProcess(flags, tmp_path / f"replica{i}.log") for i in range(3)]
    try:
        for replica in replicas:
            replica.wait_listening()
        yield replicas
    finally:
        for replica in replicas:
            replica.stop()


def test_three_replicas_route_by_digest_and_survive_a_kill_and_a_drain(fleet) -> None:  # type: ignore[no-untyped-def]
    images = [png_bytes(56, 56 + 28 * (i % 3), 900 + i) for i in range(18)]
    client = FleetClient([r.target for r in fleet], min_backoff_s=0.2)
    owners = {digest_file(image): fleet[rendezvous_order(digest_file(image), client.targets)[0]] for image in images}

    first = client.encode(images, timeout=60)
    assert all(r.ok and r.source == "COMPUTED" for r in first)
    stats = client.stats()
    # Affinity: each image was computed by, and is held in L1 by, exactly its owner.
    for replica in fleet:
        owned = sum(1 for owner in owners.values() if owner is replica)
        assert stats[replica.target].images_computed == owned == stats[replica.target].l1_entries
    assert [r.source for r in client.encode(images, timeout=60)] == ["L1"] * len(images)

    # Put and Fetch route like images: each key to its owner, whose L1 then holds it; a Fetch mixes both.
    stored = {f"mm-{i}": [torch.full((2, 4), float(i))] for i in range(6)}
    assert client.put(stored, timeout=60) == [None] * len(stored)
    key_owners = [fleet[rendezvous_order(b"put\0" + key.encode(), client.targets)[0]] for key in stored]
    puts = {target: s.puts for target, s in client.stats().items()}
    assert puts == {r.target: key_owners.count(r) for r in fleet}
    fetched = client.fetch([digest_file(image) for image in images[:3]], 60, keys=[*stored, "absent"])
    assert [r.source for r in fetched[:-1]] == ["L1"] * 9 and [r.key for r in fetched[3:-1]] == list(stored)
    assert all(torch.equal(r.embeddings[0], stored[r.key][0]) for r in fetched[3:-1])
    assert fetched[-1].error is not None and fetched[-1].error.code is grpc.StatusCode.NOT_FOUND

    # Load from two threads; one replica is killed and another drained (SIGTERM) while it runs.
    done, results, raised = [0, 0], [], []  # requests finished per worker

    def load(worker: int) -> None:
        try:
            for n in range(12):
                batch = [images[(worker * 7 + n * 3 + k) % len(images)] for k in range(3)]
                results.extend(client.encode(batch, timeout=60))
                done[worker] += 1
        except Exception as exc:  # a failed request: the assertion below shows it
            raised.append(exc)

    workers = [threading.Thread(target=load, args=(w,)) for w in range(2)]
    for worker in workers:
        worker.start()
    _wait_for(lambda: sum(done) >= 4)
    fleet[0].stop(signal.SIGKILL)
    _wait_for(lambda: sum(done) >= 12)
    fleet[1].stop(signal.SIGTERM)  # health NOT_SERVING, then refuses new calls
    for worker in workers:
        worker.join(timeout=120)
    assert not raised and sum(done) == 24 and len(results) == 72, raised
    failed = [r.error for r in results if not r.ok]
    assert not failed, failed[:3]
    # The survivor now answers everything, from L2 or its L1, computing nothing it can read from L2.
    survivor = client.stats()
    assert list(survivor) == [fleet[2].target]
    assert survivor[fleet[2].target].images_computed == stats[fleet[2].target].images_computed
    # Every Put is in the shared L2: the survivor serves the dead replicas' keys too.
    assert all(r.ok for r in client.fetch(keys=list(stored), metadata_only=True, timeout=60))
    client.close()
    with pytest.raises(grpc.RpcError):
        VitCacheClient(fleet[0].target).stats(timeout=2)


def test_with_every_replica_down_each_image_fails_unavailable_and_nothing_raises() -> None:
    from .conftest import free_port

    with FleetClient([f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"], min_backoff_s=0.1) as client:
        results = client.encode([png_bytes(56, 56, 1), png_bytes(56, 56, 2)], timeout=10)
    assert [r.index for r in results] == [0, 1]
    assert all(r.error is not None and r.error.code == grpc.StatusCode.UNAVAILABLE for r in results)
