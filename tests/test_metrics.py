"""Prometheus metrics, /api/stats, the dashboard files and `vitcache stats`, after real traffic.

Real gRPC servers on loopback with their metrics port, a real redis-server, the tiny Qwen2.5-VL.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from vitcache.client import Video, VitCacheClient
from vitcache.server import cli
from vitcache.server.metrics import ServerMetrics
from vitcache.server.stats_view import StatsView, _compute, _Snapshot, histogram_quantile
from vitcache.v1 import vitcache_pb2 as pb
from vitcache.v1 import vitcache_pb2_grpc as pb_grpc

from vitcache.config import VitcacheConfig
from vitcache.models.preprocess import preprocess

from .conftest import http_get, png_bytes
from .test_video import clip_frames, encode_clip

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    status, content_type, body = http_get(port, "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` carrying ``labels`` (KeyError if there is none)."""
    found = [v for (n, have), v in samples.items() if n == name and set(labels.items()) <= have]
    if not found:
        raise KeyError(f"{name}{labels} not exported")
    return sum(found)


@pytest.fixture
def metered(start_server_thread, encoder, redis_server):  # type: ignore[no-untyped-def]
    def start(**kwargs):  # type: ignore[no-untyped-def]
        return start_server_thread(VitcacheConfig.of(redis_url=redis_server.url, metrics_port=0, **kwargs), encoder)

    return start


def test_metrics_follow_real_traffic_by_source_stage_and_code(metered, encoder) -> None:  # type: ignore[no-untyped-def]
    server = metered(max_images_per_request=4)
    images = [png_bytes(56, 56, 1), png_bytes(84, 56, 2), png_bytes(56, 112, 3)]
    with VitCacheClient(server.target) as client:
        computed = [r.raise_for_error() for r in client.encode(images)]  # 2 RPCs: digests, then bytes
        again = [r.raise_for_error() for r in client.encode(images)]  # 1 RPC, all L1
        (garbage,) = client.encode([b"this is not an image"])  # 2 RPCs: NOT_FOUND, then INVALID_ARGUMENT
        (unknown,) = client.fetch([bytes(16)])  # NOT_FOUND
    stub = pb_grpc.VitCacheStub(grpc.insecure_channel(server.target))
    with pytest.raises(grpc.RpcError) as too_many:
        list(stub.Encode(pb.EncodeRequest(images=[pb.Image(digest=bytes(16))] * 5)))
    assert too_many.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [r.source for r in computed] == ["COMPUTED"] * 3 and [r.source for r in again] == ["L1"] * 3
    assert garbage.error.code == grpc.StatusCode.INVALID_ARGUMENT and unknown.error.code == grpc.StatusCode.NOT_FOUND
    server.call(server.engine.drain())

    m = scrape(server.running.metrics_port)
    assert value(m, "vitcache_images_total", source="computed", code="OK") == 3
    assert value(m, "vitcache_images_total", source="l1", code="OK") == 3
    assert value(m, "vitcache_images_total", source="l2", code="OK") == 0
    assert value(m, "vitcache_images_total", source="none", code="INVALID_ARGUMENT") == 1
    # Digest-only lookups that found nothing (3 + 1 hash-first rounds, the Fetch) are neither images nor errors.
    assert value(m, "vitcache_lookups_not_found_total") == 3 + 1 + 1
    assert value(m, "vitcache_images_total") == 3 + 3 + 1
    assert not any(n == "vitcache_images_total" and ("code", "NOT_FOUND") in labels for n, labels in m)
    assert value(m, "vitcache_cache_lookups_total", tier="l1", result="hit") == 3
    assert value(m, "vitcache_cache_lookups_total", tier="l2", result="hit") == 0
    assert value(m, "vitcache_cache_lookups_total", tier="l2", result="miss") >= 3 + 1 + 1
    assert value(m, "vitcache_requests_total", method="Encode", code="OK") == 5
    assert value(m, "vitcache_requests_total", method="Encode", code="INVALID_ARGUMENT") == 1
    assert value(m, "vitcache_requests_total", method="Fetch", code="OK") == 1
    assert value(m, "vitcache_request_duration_seconds_count", method="Encode") == 6
    assert value(m, "vitcache_requests_in_flight", method="Encode") == 0
    # Every stage was timed: each miss queued once, 4 images preprocessed (one failed), one write per computed image.
    assert value(m, "vitcache_stage_duration_seconds_count", stage="queue") == 3
    assert value(m, "vitcache_stage_duration_seconds_count", stage="preprocess") == 4
    assert value(m, "vitcache_stage_duration_seconds_count", stage="l1_put") == 3
    assert value(m, "vitcache_stage_duration_seconds_count", stage="l2_put") == 3
    lookups = value(m, "vitcache_cache_lookups_total", tier="l1")
    assert value(m, "vitcache_stage_duration_seconds_count", stage="l1_get") == lookups
    forwards = value(m, "vitcache_stage_duration_seconds_count", stage="forward")
    assert 1 <= forwards == value(m, "vitcache_batch_size_images_count") <= 3
    assert value(m, "vitcache_stage_duration_seconds_sum", stage="forward") > 0
    assert value(m, "vitcache_batch_size_images_sum") == 3
    patches = sum(t * h * w for r in computed for t, h, w in [r.grid_thw])
    assert value(m, "vitcache_batch_size_patches_sum") == patches
    # State read at scrape time.
    payload = sum(t.numel() * t.element_size() for r in computed for t in r.embeddings)
    assert value(m, "vitcache_l1_entries") == 3 and value(m, "vitcache_l1_bytes") == payload
    assert value(m, "vitcache_l1_capacity_bytes") == 2 << 30 and value(m, "vitcache_l1_evictions_total") == 0
    assert value(m, "vitcache_redis_enabled") == 1 and value(m, "vitcache_redis_connected") == 1
    assert value(m, "vitcache_redis_errors_total") == 0
    assert value(m, "vitcache_model_info", family=encoder.family, device="cpu") == 1
    # A CPU encoder exports no GPU memory and never initialises CUDA.
    assert not any(name.startswith("vitcache_gpu_") for name, _ in m)
    assert not torch.cuda.is_initialized()

    # A second replica on the same Redis answers from L2.
    replica = metered()
    with VitCacheClient(replica.target) as client:
        assert [r.source for r in client.fetch([r.digest for r in computed])] == ["L2"] * 3
    r = scrape(replica.running.metrics_port)
    assert value(r, "vitcache_images_total", source="l2", code="OK") == 3
    assert value(r, "vitcache_cache_lookups_total", tier="l2", result="hit") == 3
    assert value(r, "vitcache_stage_duration_seconds_count", stage="l2_get") == 3


def test_l1_evictions_and_redis_errors_are_exported(start_server_thread, encoder, own_redis) -> None:  # type: ignore[no-untyped-def]
    rgb = np.asarray(Image.open(io.BytesIO(png_bytes(56, 56, 0))))
    _, grid = preprocess(rgb, encoder.preprocess_config)
    entry_bytes = encoder.tokens_for(grid) * sum(encoder.output_hidden_sizes) * torch.finfo(encoder.dtype).bits // 8
    server = start_server_thread(
        VitcacheConfig.of(redis_url=own_redis.url, redis_timeout_s=0.2, l1_bytes=2 * entry_bytes, metrics_port=0),
        encoder,
    )
    own_redis.kill()
    with VitCacheClient(server.target) as client:
        results = client.encode([png_bytes(56, 56, seed) for seed in range(4)])
    assert all(r.ok for r in results)
    m = scrape(server.running.metrics_port)
    assert value(m, "vitcache_redis_connected") == 0 and value(m, "vitcache_redis_errors_total") >= 1
    assert value(m, "vitcache_l1_entries") == 2 and value(m, "vitcache_l1_evictions_total") == 2


def test_api_stats_dashboard_files_and_stats_command(metered, capsys) -> None:  # type: ignore[no-untyped-def]
    server = metered()
    port = server.running.metrics_port
    before = json.loads(http_get(port, "/api/stats")[2])
    assert before["totals"]["images"] == 0 and before["hit_ratio"]["overall"] is None
    images = [png_bytes(56, 56, 10 + i) for i in range(4)]
    with VitCacheClient(server.target) as client:
        client.encode(images)
        client.encode(images)
        client.encode(images[:2])

    status, content_type, body = http_get(port, "/api/stats?window=60")
    assert status == 200 and content_type == "application/json"
    stats = json.loads(body)
    assert stats["totals"]["computed"] == 4 and stats["totals"]["l1"] == 6 and stats["totals"]["l2"] == 0
    assert stats["hit_ratio"] == {"overall": 0.6, "l1": 0.6, "l2": 0.0}
    assert stats["totals"]["hit_ratio"] == 0.6
    # The 4 hash-first NOT_FOUND rounds are lookups, not errors and not images.
    assert stats["errors_by_code"] == {} and stats["rates"]["errors_per_s"] == 0
    assert stats["totals"]["images"] == 10 and stats["totals"]["lookups_not_found"] == 4
    assert stats["rates"]["lookups_not_found_per_s"] > 0
    assert stats["rates"]["images_per_s"] > 0 and stats["rates"]["requests_per_s"] > 0
    assert stats["batch"]["images_mean"] is not None and 1 <= stats["batch"]["images_mean"] <= 4
    for stage in ("request", "queue", "preprocess", "forward", "l1_get", "l1_put"):
        p50, p99 = stats["latency_ms"][stage]["p50"], stats["latency_ms"][stage]["p99"]
        assert 0 < p50 <= p99, stage
    assert stats["l1"]["entries"] == 4 and 0 < stats["l1"]["fill"] < 1
    assert stats["redis"] == {"enabled": True, "connected": True, "errors": 0, "corrupt_entries": 0}
    assert stats["gpu"] is None

    status, content_type, page = http_get(port, "/")
    assert status == 200 and content_type.startswith("text/html") and b'src="vendor/uPlot.iife.min.js"' in page
    status, content_type, script = http_get(port, "/vendor/uPlot.iife.min.js")
    assert status == 200 and "javascript" in content_type and b"uPlot" in script
    assert http_get(port, "/dashboard.js")[0] == 200
    assert http_get(port, "/no/such/page")[0] == 404
    assert http_get(port, "/api/stats?window=soon")[0] == 400

    assert cli.main(["stats", "--metrics-url", f"http://127.0.0.1:{port}", "--window", "60"]) == 0
    out = capsys.readouterr().out
    assert "60.0 %   L1 60.0 %   L2 0.0 %" in out  # hit ratio: overall, per tier
    assert re.search(r"images +10   L1 6   L2 0   computed 4", out)  # image results by source
    assert re.search(r"digest lookups +4 not found", out) and re.search(r"by error code +none", out)
    assert "NOT_FOUND" not in out and "Redis" in out and "connected" in out and "videos" not in out
    assert all(stage in out for stage in ("request", "queue", "preprocess", "forward", "l1_get"))


def test_stats_window_covers_the_seconds_asked_for_however_long_since_the_last_poll() -> None:
    """`vitcache stats --window 5` printed "last 31.1 s" when the last poll was 31 s ago: the server's
    own samples (one a second here, on a clock the test turns) must set the window, not the polls."""
    clock = [0.0]
    metrics = ServerMetrics()
    view = StatsView(metrics.registry, sample_interval_s=1.0, max_window_s=20.0, clock=lambda: clock[0])
    served = metrics.images.labels("l1", "OK", "image")
    for second in range(1, 41):  # one image a second, sampled each second; one poll, at 10 s
        clock[0] = float(second)
        served.inc()
        view.sample()
        if second == 10:
            view.stats(5)
    clock[0] = 40.3
    for _ in range(5):
        served.inc()
    stats = view.stats(5)
    assert stats["window_s"] == pytest.approx(5.3)  # from the sample at 35 s, the nearest to 35.3 s
    assert stats["rates"]["images_per_s"] == pytest.approx((5 + 5) / 5.3)
    assert view.stats(1000)["window_s"] == pytest.approx(20.3)  # at most max_window_s, the ring's reach
    assert view.stats(0)["window_s"] == pytest.approx(1.3)  # at least one sample interval


def test_stats_sampler_thread_samples_until_stopped() -> None:
    metrics = ServerMetrics()
    view = StatsView(metrics.registry, sample_interval_s=0.01)
    metrics.images.labels("computed", "OK", "image").inc()
    view.start()
    deadline = time.monotonic() + 30
    # Only the first sample predates the image: the shortest window leaves it out once the thread took more.
    while view.stats(0.01)["rates"]["images_per_s"] > 0:
        assert time.monotonic() < deadline, "the sampler took no sample"
        time.sleep(0.01)
    view.stop()
    assert not any(thread.name == "vitcache-stats" for thread in threading.enumerate())


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    # 10 observations: 4 in (0, 1], 4 in (1, 2], 2 in (2, +Inf).
    buckets = [(1.0, 4.0), (2.0, 8.0), (float("inf"), 10.0)]
    assert histogram_quantile(0.2, buckets) == pytest.approx(0.5)  # rank 2 of 4 in the first bucket
    assert histogram_quantile(0.5, buckets) == pytest.approx(1.25)  # rank 5: 1 of 4 into (1, 2]
    assert histogram_quantile(0.99, buckets) == 2.0  # in +Inf: the highest finite bound
    assert histogram_quantile(0.5, [(1.0, 0.0), (float("inf"), 0.0)]) is None


def test_gpu_busy_fraction_is_device_seconds_per_second_of_the_window() -> None:
    """Each GPU's device seconds (forward plus copies) over the window's seconds: how close its
    encoder is to its limit; the mean over GPUs for the server. None for an encoder on the CPU."""
    on = (("device", "cuda:0"), ("model", "m"))

    def snapshot(at: float, seconds0: float, seconds1: float, images0: float) -> _Snapshot:
        samples = {("vitcache_model_info", on): 1.0}
        for gpu, device_seconds, images in (("cuda:0", seconds0, images0), ("cuda:1", seconds1, 0.0)):
            samples[("vitcache_encoder_alive", (("gpu", gpu),))] = 1.0
            samples[("vitcache_encoder_device_seconds_total", (("gpu", gpu),))] = device_seconds
            samples[("vitcache_encoder_images_total", (("gpu", gpu),))] = images
        return _Snapshot(at, samples)

    stats = _compute(snapshot(104.0, 7.0, 2.0, 40.0), snapshot(100.0, 4.0, 1.0, 0.0))
    assert [(g["device"], g["busy_fraction"], g["images_per_s"]) for g in stats["gpus"]] == [
        ("cuda:0", pytest.approx(0.75), pytest.approx(10.0)),
        ("cuda:1", pytest.approx(0.25), 0.0),
    ]
    assert stats["gpu"]["busy_fraction"] == pytest.approx(0.5) and stats["gpu"]["live"] == 2
    on_cpu = {("vitcache_model_info", (("device", "cpu"),)): 1.0}
    assert _compute(_Snapshot(104.0, on_cpu), _Snapshot(100.0, on_cpu))["gpu"] is None


def test_metrics_port_off_by_default(start_server_thread, encoder) -> None:  # type: ignore[no-untyped-def]
    server = start_server_thread(VitcacheConfig.of(), encoder)
    assert server.running.metrics_port is None and server.running.metrics is not None


def test_get_stats_api_stats_and_metrics_agree(metered) -> None:  # type: ignore[no-untyped-def]
    """All three read the engine's one snapshot (and the observer's counters), so after the same traffic
    they tell the same numbers."""
    server = metered()
    images = [png_bytes(56, 56, 21), png_bytes(84, 56, 22)]
    with VitCacheClient(server.target) as client:
        client.encode(images)
        client.encode(images)  # L1 hits
        client.fetch([bytes(16)])  # NOT_FOUND
        stats = client.stats()
    server.call(server.engine.drain())
    m = scrape(server.running.metrics_port)
    status, _, body = http_get(server.running.metrics_port, "/api/stats")
    assert status == 200
    api = json.loads(body)
    assert stats.l1_entries == api["l1"]["entries"] == value(m, "vitcache_l1_entries") == 2
    assert stats.l1_bytes == api["l1"]["bytes"] == value(m, "vitcache_l1_bytes") > 0
    assert stats.l1_capacity_bytes == api["l1"]["capacity_bytes"] == value(m, "vitcache_l1_capacity_bytes")
    assert stats.l1_hits == api["totals"]["l1"] == value(m, "vitcache_images_total", source="l1") == 2
    assert stats.misses == api["totals"]["computed"] == value(m, "vitcache_images_total", source="computed") == 2
    assert stats.batches == api["totals"]["forwards"] == value(m, "vitcache_encoder_forwards_total") >= 1
    assert stats.images_computed == value(m, "vitcache_encoder_images_total") == 2
    assert stats.l2_errors == api["redis"]["errors"] == value(m, "vitcache_redis_errors_total") == 0
    assert stats.redis_connected == api["redis"]["connected"] == bool(value(m, "vitcache_redis_connected"))
    (encoder_stats,) = stats.encoders
    assert [g["device"] for g in api["gpus"]] == [encoder_stats.device] == ["cpu"]
    assert encoder_stats.images == value(m, "vitcache_encoder_images_total", gpu="cpu")
    # A snapshot is a copy: later traffic does not change what a reader already holds.
    before = server.engine.snapshot()
    with VitCacheClient(server.target) as client:
        client.encode([png_bytes(56, 112, 23)])
    after = server.engine.snapshot()
    assert (before.images.misses, before.batcher.images, before.encoders[0].stats.images, before.l1.entries) == (2,) * 4
    assert (after.images.misses, after.batcher.images, after.encoders[0].stats.images, after.l1.entries) == (3,) * 4


def test_videos_are_counted_apart_alike_in_get_stats_api_stats_and_metrics(metered, capsys) -> None:  # type: ignore[no-untyped-def]
    """Images and a clip, twice, then a broken image and a broken clip: each reader tells the clips apart
    (computed, from L1, failed, their tokens), and sums over kinds still count every item."""
    server = metered()
    images, clip = [png_bytes(56, 56, 31), png_bytes(84, 56, 32)], Video(encode_clip(clip_frames(6, 56, 56)))
    with VitCacheClient(server.target) as client:
        computed = [r.raise_for_error() for r in client.encode([*images, clip])]
        again = [r.raise_for_error() for r in client.encode([*images, clip])]
        broken = client.encode([b"not an image", Video(b"not a video" * 64)])
        stats = client.stats()
    server.call(server.engine.drain())
    assert [r.source for r in computed] == ["COMPUTED"] * 3 and [r.source for r in again] == ["L1"] * 3
    assert [r.error.code for r in broken] == [grpc.StatusCode.INVALID_ARGUMENT] * 2  # type: ignore[union-attr]
    tokens = 2 * computed[2].embeddings[0].shape[0]  # the clip's rows, answered twice
    assert computed[2].video is not None and tokens > 0

    videos = stats.videos
    assert (videos.misses, videos.l1_hits, videos.l2_hits, videos.errors, videos.tokens) == (1, 1, 0, 1, tokens)
    assert (stats.misses, stats.l1_hits, stats.errors) == (3, 3, 2)  # clips are counted with the images too
    m = scrape(server.running.metrics_port)
    assert value(m, "vitcache_images_total", kind="video", source="computed") == videos.misses
    assert value(m, "vitcache_images_total", kind="video", source="l1") == videos.l1_hits
    assert value(m, "vitcache_images_total", kind="video", source="none", code="INVALID_ARGUMENT") == 1
    assert value(m, "vitcache_images_total", kind="image", source="computed") == 2
    assert value(m, "vitcache_images_total", source="computed") == stats.misses  # a sum over kinds: every item
    assert value(m, "vitcache_video_tokens_total") == tokens
    status, _, body = http_get(server.running.metrics_port, "/api/stats?window=300")
    assert status == 200
    api = json.loads(body)
    assert api["videos"]["total"] == 3 and api["totals"]["images"] == 8
    assert api["videos"]["hit_ratio_total"] == 0.5 and api["totals"]["hit_ratio"] == 0.5
    assert api["videos"]["hit_ratio"] == 0.5 and api["videos"]["tokens"] == tokens and api["videos"]["per_s"] > 0
    assert api["errors_by_code"] == {"INVALID_ARGUMENT": 2}  # the image's and the clip's, summed over kinds
    assert cli.main(["stats", "--metrics-url", f"http://127.0.0.1:{server.running.metrics_port}"]) == 0
    assert re.search(rf"of them videos +3   hit ratio 50.0 %   {tokens} tokens", capsys.readouterr().out)


def test_interceptor_builds_each_methods_observing_handler_once_and_counts_each_call() -> None:
    """Wrapping a handler and looking up its metric children cost the serving process per RPC; they
    are made on a method's first call. A refusal (a handler of its own call) is still counted apart."""
    metrics = ServerMetrics()
    interceptor = metrics.interceptor("vitcache.v1.VitCache")

    async def answer(request: bytes, context: object) -> bytes:
        return b"ok"

    async def refuse(request: bytes, context: object) -> bytes:
        raise PermissionError("refused")

    registered = grpc.unary_unary_rpc_method_handler(answer)
    refusal = grpc.unary_unary_rpc_method_handler(refuse)
    details = type("Details", (), {"method": "/vitcache.v1.VitCache/GetStats", "invocation_metadata": ()})()

    async def calls() -> list[grpc.RpcMethodHandler]:
        handlers = []
        for handler in (registered, registered, refusal, registered):

            async def continuation(_: object, handler: grpc.RpcMethodHandler = handler) -> grpc.RpcMethodHandler:
                return handler

            observing = await interceptor.intercept_service(continuation, details)
            handlers.append(observing)
            context = type("Context", (), {"code": lambda self: grpc.StatusCode.PERMISSION_DENIED})()
            with contextlib.suppress(PermissionError):
                await observing.unary_unary(b"", context)
        return handlers

    first, second, refused, after = asyncio.run(calls())
    assert first is second and refused is not first and after.unary_unary is not None
    counted = metrics.registry.get_sample_value
    assert counted("vitcache_requests_total", {"method": "GetStats", "code": "OK"}) == 3
    assert counted("vitcache_requests_total", {"method": "GetStats", "code": "PERMISSION_DENIED"}) == 1
    assert counted("vitcache_request_duration_seconds_count", {"method": "GetStats"}) == 4
    assert counted("vitcache_requests_in_flight", {"method": "GetStats"}) == 0
