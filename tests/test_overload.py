"""Overload: a bounded queue of misses, per-call deadlines, and small requests holding millions of items,
on a real server and model."""

from __future__ import annotations

import gc
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from vitcache.client import VitCacheClient
from vitcache.v1 import vitcache_pb2 as pb

from vitcache.config import VitcacheConfig

from .conftest import png_bytes


def test_misses_beyond_the_queue_bound_fail_fast_and_alone(start_server_thread, encoder) -> None:  # type: ignore[no-untyped-def]
    srv = start_server_thread(VitcacheConfig.of(max_queued_images=2), encoder)
    images = [png_bytes(56, 56, 100 + i) for i in range(6)]
    with VitCacheClient(srv.target) as client:
        results = client.encode(images)
        stats = client.stats()
        ok = [r for r in results if r.ok]
        refused = [r for r in results if not r.ok]
        # All six reach admission in one loop turn: exactly the bound is taken, the rest refused.
        assert len(ok) == 2 and len(refused) == 4
        assert all(r.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)  # type: ignore[union-attr]
        assert all("--max-queued-images" in r.error.message for r in refused)  # type: ignore[union-attr]
        assert stats.overloaded == 4 and stats.images_computed == 2 and stats.l1_entries == 2
        # Nothing of the refused images was kept; once the queue drains they are served.
        retry = client.encode([images[r.index] for r in refused[:2]])
        assert [r.source for r in retry] == ["COMPUTED", "COMPUTED"]


def test_an_image_whose_deadline_passes_while_queued_never_reaches_the_device(  # type: ignore[no-untyped-def]
    start_server_thread, encoder, caplog
) -> None:
    # The batcher holds a lone image for up to 1.5 s waiting for company; the call allows 0.3 s.
    cfg = VitcacheConfig.of(max_batch_wait_s=1.5)
    srv = start_server_thread(cfg, encoder)
    with VitCacheClient(srv.target) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.encode([png_bytes(56, 56, 200)], timeout=0.3)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        stats = client.stats()
        for _ in range(40):  # the server drops it when the batch closes (<= 1.5 s)
            if stats.deadline_expired:
                break
            time.sleep(0.1)
            stats = client.stats()
        assert stats.deadline_expired == 1 and stats.batches == 0 and stats.images_computed == 0
        assert stats.l1_entries == 0
        # Its request was gone (cancelled with the call) when the computation failed: no one is left to
        # retrieve the error, and asyncio must not log it as an unhandled one.
        gc.collect()
        assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
        # Without a deadline the same image is computed.
        assert client.encode([png_bytes(56, 56, 200)])[0].source == "COMPUTED"


def _call_and_worst_health_check(target: str, method: str, request: bytes) -> tuple[float, list, float]:
    """Runs one raw ``method`` call, health-checking the server until it ends: (call seconds, its answers
    or error, slowest health check in seconds)."""
    channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", -1)])
    health = health_pb2_grpc.HealthStub(channel)
    health.Check(health_pb2.HealthCheckRequest(), timeout=30)  # connected before timing
    answer: list = []

    def call() -> None:
        started = time.monotonic()
        try:
            if method == PUT:
                answer.append(channel.unary_unary(method)(request, timeout=120))
            else:
                answer.extend(channel.unary_stream(method)(request, timeout=120))
        except grpc.RpcError as exc:
            answer.append(exc)
        answer.insert(0, time.monotonic() - started)

    worker = threading.Thread(target=call)
    gc.freeze()  # a full collection of the test process's heap (~1 s here) is not what is measured
    try:
        worker.start()
        worst = 0.0
        while worker.is_alive():
            started = time.monotonic()
            health.Check(health_pb2.HealthCheckRequest(), timeout=120)
            worst = max(worst, time.monotonic() - started)
            time.sleep(0.005)
        worker.join()
    finally:
        gc.unfreeze()
    channel.close()
    return answer[0], answer[1:], worst


ENCODE, FETCH, PUT = (f"/vitcache.v1.VitCache/{name}" for name in ("Encode", "Fetch", "Put"))


def test_counts_are_checked_from_the_wire_before_any_per_item_work(start_server_thread, encoder) -> None:  # type: ignore[no-untyped-def]
    """Small requests holding millions of items are refused without parsing them: it took 16 s (and
    health checks waited as long) for 2,000,000 empty images, 1.6 s for 3,000,000 grid values (#14 item 2).
    They take 0.01-0.08 s now on a loaded 2-core machine; the bounds are 1 s."""
    srv = start_server_thread(VitcacheConfig.of(max_images_per_request=8), encoder)
    grid_values = pb.PixelBatch(
        pixel_values=pb.Tensor(dtype="float32", shape=[1, 1176], data=bytes(4 * 1176)), image_grid_thw=[1] * 3_000_000
    )
    requests = [
        (ENCODE, b"\x0a\x00" * 2_000_000),  # 2,000,000 empty Images: 4 MB
        (ENCODE, pb.EncodeRequest(pixels=grid_values).SerializeToString()),
        (FETCH, pb.FetchRequest(digests=[bytes(16)] * 1_000_000).SerializeToString()),
        (PUT, b"\x0a\x00" * 2_000_000),  # 2,000,000 empty PutItems
    ]
    for method, request in requests:
        seconds, (error,), worst_health_check = _call_and_worst_health_check(srv.target, method, request)
        assert isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "over --max-images-per-request=8" in error.details()
        assert seconds < 1.0 and worst_health_check < 1.0, (method, seconds, worst_health_check)


def test_a_put_item_of_a_million_tensors_fails_alone_off_the_event_loop(start_server_thread, encoder) -> None:  # type: ignore[no-untyped-def]
    """An item's tensors are only counted by the engine once the item is built: that is done with the
    parse, in a worker thread, so the item fails alone and health checks are answered meanwhile."""
    srv = start_server_thread(VitcacheConfig.of(), encoder)
    items = [
        pb.PutItem(key="many", embeddings=[pb.Tensor()] * 5_000_000),  # 10 MB: about 0.7 GB and 8 s to build
        pb.PutItem(key="empty"),
        pb.PutItem(key="dims", embeddings=[pb.Tensor(dtype="float32", shape=[1] * 3_000_000)]),
        pb.PutItem(key="grid", grid_thw=[1] * 3_000_000, embeddings=[pb.Tensor(dtype="float32", shape=[0])]),
        pb.PutItem(key="ok", grid_thw=[1, 1, 1], embeddings=[pb.Tensor(dtype="float32", shape=[1], data=b"\0" * 4)]),
    ]
    request = pb.PutRequest(items=items).SerializeToString()
    seconds, (response,), worst_health_check = _call_and_worst_health_check(srv.target, PUT, request)
    put = pb.PutResponse.FromString(response)
    assert [r.error_code for r in put.results] == [grpc.StatusCode.INVALID_ARGUMENT.value[0]] * 4 + [0]
    assert "1 to 8 tensors" in put.results[0].error_message and "dimensions" in put.results[2].error_message
    # Counted from the wire before anything is built: no item of millions is parsed at all.
    assert seconds < 1.0 and worst_health_check < 1.0, (seconds, worst_health_check)
