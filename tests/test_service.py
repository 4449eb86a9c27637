"""The service end to end: real gRPC server on loopback, real redis-server, real tiny Qwen2.5-VL."""

from __future__ import annotations

import asyncio
import io
import logging
import signal
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from PIL import Image
from vitcache.client import AsyncVitCacheClient, VitCacheClient
from vitcache.v1 import vitcache_pb2 as pb
from vitcache.v1 import vitcache_pb2_grpc as pb_grpc

from vitcache.cache.tiers import RedisTier
from vitcache.config import ModelConfig, VitcacheConfig
from vitcache.digest import digest_file
from vitcache.encode.encoder_pool import EncoderPool
from vitcache.models.loading import load_encoder
from vitcache.models.preprocess import preprocess

from .conftest import RedisProcess, jpeg_bytes, png_bytes


def config(**kwargs) -> VitcacheConfig:  # type: ignore[no-untyped-def]
    return VitcacheConfig.of(**kwargs)


@pytest.fixture
def server(start_server_thread, encoder):  # type: ignore[no-untyped-def]
    return start_server_thread(config(), encoder)


@pytest.fixture
def redis_backed(start_server_thread, encoder, redis_server):  # type: ignore[no-untyped-def]
    return start_server_thread(config(redis_url=redis_server.url), encoder)


def reference(checkpoint: Path, images: list[bytes]) -> list[torch.Tensor]:
    """What transformers' own model and processor give for these image files."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil.from_pretrained(checkpoint)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint).eval()
    pil = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
    inputs = processor(images=pil, return_tensors="pt")
    with torch.inference_mode():
        out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    return list(out.pooler_output)


def test_encode_equals_transformers_and_hits_return_exact_bytes(server, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    images = [png_bytes(64, 48, 1), png_bytes(100, 30, 2), png_bytes(30, 100, 3)]
    with VitCacheClient(server.target) as client:
        first = [r.raise_for_error() for r in client.encode(images)]
        second = [r.raise_for_error() for r in client.encode(images)]
    assert [r.source for r in first] == ["COMPUTED"] * 3
    assert [r.source for r in second] == ["L1"] * 3
    for got, want in zip(first, reference(tiny_checkpoint, images), strict=True):
        (merged,) = got.embeddings
        assert merged.device.type == "cpu" and merged.dtype == torch.float32
        assert merged.shape == want.shape
        # Same weights; pixels differ only by PIL's uint8 resize vs ours (see test_preprocess).
        torch.testing.assert_close(merged, want, atol=5e-2, rtol=5e-2)
    for a, b in zip(first, second, strict=True):
        assert a.digest == b.digest == digest_file(images[a.index])
        assert a.embeddings[0].numpy().tobytes() == b.embeddings[0].numpy().tobytes()
        t, h, w = a.grid_thw
        assert a.embeddings[0].shape[0] == t * h * w // 4


def test_pixel_batch_split_equals_single_images_and_transformers(server, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    from transformers import Qwen2_5_VLForConditionalGeneration

    encoder_config = load_encoder(ModelConfig(str(tiny_checkpoint))).preprocess_config
    rng = np.random.default_rng(7)
    pixels = [
        preprocess(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), encoder_config)
        for h, w in [(56, 84), (112, 56), (84, 84)]
    ]
    batch = torch.cat([p for p, _ in pixels])
    grids = [g for _, g in pixels]
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    with torch.inference_mode():
        want = model.model.get_image_features(batch, torch.tensor(grids)).pooler_output
    with VitCacheClient(server.target) as client:
        together = [r.raise_for_error() for r in client.encode_pixels(batch, grids)]
        alone = [client.encode_pixels(p, [g])[0].raise_for_error() for p, g in pixels]
    for i in range(3):
        assert together[i].grid_thw == grids[i] == alone[i].grid_thw
        assert together[i].digest == alone[i].digest
        torch.testing.assert_close(together[i].embeddings[0], want[i], atol=1e-5, rtol=1e-5)
    assert [r.source for r in alone] == ["L1"] * 3  # the batch already cached each image on its own


def test_non_finite_pixels_fail_alone_and_non_finite_outputs_are_never_cached(  # type: ignore[no-untyped-def]
    redis_backed, redis_server, tiny_checkpoint
) -> None:
    from transformers import Qwen2_5_VLForConditionalGeneration

    rng = np.random.default_rng(8)
    valid, grid = preprocess(
        rng.integers(0, 256, (56, 56, 3), dtype=np.uint8), redis_backed.engine.spec.preprocess_config
    )
    nan, inf = valid.clone(), valid.clone()
    nan[5, 17] = float("nan")
    inf[0, 0] = float("-inf")
    huge = torch.full_like(valid, 3e38)  # finite, but the forward overflows: a non-finite output
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    with torch.inference_mode():
        want = model.model.get_image_features(valid, torch.tensor([grid])).pooler_output[0]
        assert not model.model.get_image_features(huge, torch.tensor([grid])).pooler_output[0].isfinite().all()
    with VitCacheClient(redis_backed.target) as client:
        for source in ("COMPUTED", "L1"):  # the second time only the valid image comes from a cache
            results = client.encode_pixels(torch.cat([nan, valid, inf, huge]), [grid] * 4)
            for i in (0, 2):
                assert results[i].error is not None and results[i].error.code == grpc.StatusCode.INVALID_ARGUMENT
                assert "NaN or infinite" in results[i].error.message
            assert results[3].error is not None and results[3].error.code == grpc.StatusCode.INTERNAL
            assert "not finite" in results[3].error.message
            assert results[1].source == source
            torch.testing.assert_close(results[1].embeddings[0], want, atol=1e-5, rtol=1e-5)
        assert client.stats().l1_entries == 1
    redis_backed.call(redis_backed.engine.drain())
    assert len(redis_server.client().keys("vitcache:v1:*")) == 1


def test_a_bad_grid_in_a_pixel_batch_fails_alone(server, encoder) -> None:  # type: ignore[no-untyped-def]
    """One pixel batch: a grid the model cannot take (h not a multiple of the merge size), a valid image,
    and a grid larger than the model's max_pixels (128*28*28: 512 patches) makes. Each bad one fails at its
    own index; the valid one gets the embeddings it gets alone (#14 items 7 and 21)."""
    rng = np.random.default_rng(3)
    valid, grid = preprocess(rng.integers(0, 256, (56, 84, 3), dtype=np.uint8), encoder.preprocess_config)
    odd, too_large = (1, 3, 4), (1, 24, 24)
    rows = [torch.zeros(12, valid.shape[1]), valid, torch.zeros(24 * 24, valid.shape[1])]
    with VitCacheClient(server.target) as client:
        results = client.encode_pixels(torch.cat(rows), [odd, grid, too_large])
        alone = client.encode_pixels(valid, [grid])[0].raise_for_error()
    assert [r.index for r in results] == [0, 1, 2]
    for bad, grid_thw in ((results[0], odd), (results[2], too_large)):
        assert bad.error is not None and bad.error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert str(list(grid_thw)) in bad.error.message and not bad.embeddings
    assert "merge size" in results[0].error.message and "max_pixels=100352" in results[2].error.message
    good = results[1].raise_for_error()
    assert good.grid_thw == grid and alone.source == "L1"
    assert good.embeddings[0].numpy().tobytes() == alone.embeddings[0].numpy().tobytes()


def test_restart_keeps_l2_hits_and_fetch_finds_them(start_server_thread, encoder, redis_server) -> None:  # type: ignore[no-untyped-def]
    images = [png_bytes(56, 56, 11), png_bytes(84, 56, 12)]
    first_server = start_server_thread(config(redis_url=redis_server.url), encoder)
    with VitCacheClient(first_server.target) as client:
        first = client.encode(images)
    first_server.call(first_server.engine.drain())
    first_server.stop()
    assert len(redis_server.client().keys("vitcache:v1:*")) == 2

    second_server = start_server_thread(config(redis_url=redis_server.url), encoder)
    with VitCacheClient(second_server.target) as client:
        fetched = client.fetch([r.digest for r in first])
        again = client.encode(images)
        stats = client.stats()
    assert [r.source for r in fetched] == ["L2", "L2"]
    assert [r.source for r in again] == ["L1", "L1"]  # the L2 hit filled L1
    for a, b in zip(first, fetched, strict=True):
        assert a.embeddings[0].numpy().tobytes() == b.embeddings[0].numpy().tobytes()
    assert stats.l2_hits == 2 and stats.images_computed == 0 and stats.redis_connected


def test_namespace_change_never_returns_old_embeddings(start_server_thread, tiny_checkpoint, redis_server) -> None:  # type: ignore[no-untyped-def]
    image = png_bytes(64, 64, 21)
    fp32 = load_encoder(ModelConfig(str(tiny_checkpoint), "cpu", "float32"))
    bf16 = load_encoder(ModelConfig(str(tiny_checkpoint), "cpu", "bfloat16"))
    assert fp32.namespace != bf16.namespace
    a = start_server_thread(config(redis_url=redis_server.url), fp32)
    with VitCacheClient(a.target) as client:
        assert client.encode([image])[0].source == "COMPUTED"
    a.call(a.engine.drain())
    b = start_server_thread(config(redis_url=redis_server.url), bf16)
    with VitCacheClient(b.target) as client:
        result = client.encode([image])[0].raise_for_error()
        info = client.model_info()
    assert result.source == "COMPUTED" and result.embeddings[0].dtype == torch.bfloat16
    assert info.namespace == bf16.namespace and info.dtype == "bfloat16"
    assert len(redis_server.client().keys("vitcache:v1:*")) == 2  # one entry per namespace


def test_redis_killed_mid_test_keeps_serving_and_reconnects(
    start_server_thread, encoder, own_redis: RedisProcess
) -> None:  # type: ignore[no-untyped-def]
    cfg = config(redis_url=own_redis.url, redis_timeout_s=0.2)
    srv = start_server_thread(cfg, encoder)
    with VitCacheClient(srv.target) as client:
        assert client.encode([png_bytes(56, 56, 31)])[0].ok
        assert client.stats().redis_connected
        own_redis.kill()
        during = client.encode([png_bytes(56, 56, 32), png_bytes(56, 84, 33)])
        assert all(r.ok and r.source == "COMPUTED" for r in during)
        assert client.encode([png_bytes(56, 56, 31)])[0].source == "L1"
        stats = client.stats()
        assert not stats.redis_connected and stats.l2_errors >= 1
        own_redis.start()  # same port
        for _ in range(100):
            result = client.encode([png_bytes(28 * 3, 28 * 2, 34 + _)])[0]
            assert result.ok
            if client.stats().redis_connected:
                break
            threading.Event().wait(0.1)
        assert client.stats().redis_connected
    srv.call(srv.engine.drain())
    assert own_redis.client().dbsize() >= 1  # writes flow again


def test_redis_unreachable_at_start_and_every_change_are_logged_without_the_password(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    redis = RedisProcess(tmp_path / "redis", password="s3cret")  # its port is chosen; not started yet
    caplog.set_level(logging.INFO, logger="vitcache.cache.tiers")

    async def run() -> list[bool]:
        tier = RedisTier(redis.url, "ns", timeout_s=0.5)
        answers = [await tier.ping()]  # at start-up: nothing listens there
        redis.start()
        answers += [await tier.ping(), await tier.ping()]  # up (logged once)
        redis.kill()
        answers += [await tier.ping(), await tier.ping()]  # down (logged once)
        redis.start()
        answers.append(await tier.ping())
        assert redis.proc is not None
        redis.proc.send_signal(signal.SIGSTOP)  # hung: a timeout, whose exception has no text
        answers.append(await tier.ping())
        redis.proc.send_signal(signal.SIGCONT)
        answers.append(await tier.ping())
        await tier.close()
        return answers

    try:
        assert asyncio.run(run()) == [False, True, True, False, False, True, False, True]
    finally:
        redis.kill()
    logged = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in logged] == [logging.WARNING, logging.INFO] * 3
    assert "(TimeoutError)" in logged[-2][1]
    where = f"redis://:***@127.0.0.1:{redis.port}/0"
    assert all(where in message and "s3cret" not in message for _, message in logged), logged


def test_corrupt_redis_entry_is_a_miss_and_gets_recomputed(start_server_thread, encoder, redis_server) -> None:  # type: ignore[no-untyped-def]
    image = png_bytes(56, 56, 41)
    first = start_server_thread(config(redis_url=redis_server.url), encoder)
    with VitCacheClient(first.target) as client:
        want = client.encode([image])[0].raise_for_error()
    first.call(first.engine.drain())
    (key,) = redis_server.client().keys("vitcache:v1:*")
    value = redis_server.client().get(key)
    redis_server.client().set(key, value[:-8] + b"\x00" * 8)  # same length, bad checksum
    second = start_server_thread(config(redis_url=redis_server.url), encoder)
    with VitCacheClient(second.target) as client:
        got = client.encode([image])[0].raise_for_error()
        stats = client.stats()
    assert got.source == "COMPUTED" and stats.l2_corrupt == 1
    assert got.embeddings[0].numpy().tobytes() == want.embeddings[0].numpy().tobytes()
    second.call(second.engine.drain())
    assert redis_server.client().get(key) == value  # repaired by the recomputation


@pytest.mark.parametrize("kind", ["list", "hash"])
def test_keys_of_the_wrong_type_are_corrupt_entries_not_a_redis_outage(
    start_server_thread, encoder, redis_server, kind
) -> None:  # type: ignore[no-untyped-def]
    images = stored, locked, other = png_bytes(56, 56, 42), png_bytes(56, 84, 43), png_bytes(84, 56, 44)
    first = start_server_thread(config(redis_url=redis_server.url), encoder)
    with VitCacheClient(first.target) as client:
        want = client.encode([stored])[0].raise_for_error()
    first.call(first.engine.drain())
    prefix = f"vitcache:v1:{encoder.namespace}:"
    value_key, lock_key = prefix + digest_file(stored).hex(), prefix + digest_file(locked).hex() + ":lock"
    redis = redis_server.client()
    value = redis.get(value_key)
    for key in (value_key, lock_key):  # as a careless operator or another program leaves them
        redis.delete(key)
        redis.rpush(key, "x") if kind == "list" else redis.hset(key, "x", "y")
    # A lock that could not be taken would hold the second image for the lock's 30 s lifetime.
    second = start_server_thread(config(redis_url=redis_server.url, fleet_lock_ttl_s=30.0), encoder)
    with VitCacheClient(second.target) as client:
        got, computed, after = (client.encode([image], timeout=10)[0].raise_for_error() for image in images)
        stats = client.stats()
    assert got.source == computed.source == after.source == "COMPUTED"
    assert got.embeddings[0].numpy().tobytes() == want.embeddings[0].numpy().tobytes()
    assert stats.l2_corrupt == 2 and stats.l2_errors == 0 and stats.redis_connected and stats.fleet_lock_waits == 0
    second.call(second.engine.drain())
    assert redis.get(value_key) == value  # overwritten by the recomputation
    assert redis.exists(prefix + digest_file(locked).hex(), prefix + digest_file(other).hex()) == 2  # writes went on
    assert not redis.exists(lock_key)  # taken over, then released


def test_bad_and_oversized_images_fail_alone(start_server_thread, encoder) -> None:  # type: ignore[no-untyped-def]
    srv = start_server_thread(config(max_image_bytes=200_000, max_image_pixels=512 * 512), encoder)
    good = png_bytes(56, 56, 51)
    truncated = png_bytes(64, 64, 52)[:200]
    buf = io.BytesIO()
    Image.new("RGB", (600, 600), (9, 9, 9)).save(buf, format="PNG")  # small file, too many pixels
    too_many_pixels = buf.getvalue()
    channel = grpc.insecure_channel(srv.target)
    stub = pb_grpc.VitCacheStub(channel)
    request = pb.EncodeRequest(
        images=[
            pb.Image(encoded=good),
            pb.Image(encoded=b"not an image at all"),
            pb.Image(encoded=truncated),
            pb.Image(encoded=b"\x89PNG" + b"\0" * 300_000),  # over --max-image-bytes
            pb.Image(encoded=too_many_pixels),
            pb.Image(raw=pb.RawImage(rgb=b"\0" * 10, height=4, width=4)),
            pb.Image(digest=b"short"),
            pb.Image(),
            pb.Image(raw=pb.RawImage(rgb=b"\7" * 56 * 56 * 3, height=56, width=56)),
        ]
    )
    results = {r.index: r for r in stub.Encode(request)}
    assert sorted(results) == list(range(9))
    assert results[0].error_code == 0 and results[8].error_code == 0
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    for i in range(1, 8):
        assert results[i].error_code == invalid, (i, results[i].error_message)
        assert results[i].error_message and not results[i].embeddings
    assert "limit" in results[3].error_message and "pixels" in results[4].error_message
    stats = stub.GetStats(pb.GetStatsRequest())
    assert stats.l1_entries == 2 and stats.errors == 7 and stats.images_computed == 2
    # The server still serves, and nothing was cached for the bad inputs.
    again = list(stub.Encode(pb.EncodeRequest(images=[pb.Image(encoded=good)])))
    assert again[0].source == pb.L1
    channel.close()


def test_request_needs_exactly_one_of_images_and_pixels(server) -> None:  # type: ignore[no-untyped-def]
    channel = grpc.insecure_channel(server.target)
    stub = pb_grpc.VitCacheStub(channel)
    both = pb.EncodeRequest(images=[pb.Image(encoded=png_bytes(28, 28, 1))], pixels=pb.PixelBatch())
    for request in (pb.EncodeRequest(), both):
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Encode(request))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad_grid = pb.EncodeRequest(
        pixels=pb.PixelBatch(
            pixel_values=pb.Tensor(dtype="float32", shape=[4, 1176], data=b"\0" * 4 * 1176 * 4),
            image_grid_thw=[1, 2, 4],
        )
    )
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Encode(bad_grid))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "adds up to 8" in err.value.details()
    channel.close()


def test_unknown_digest_is_not_found_and_upload_happens_only_for_misses(server) -> None:  # type: ignore[no-untyped-def]
    sent: list[pb.EncodeRequest] = []

    class Record(grpc.UnaryStreamClientInterceptor):
        def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
            sent.append(request)
            return continuation(details, request)

    images = [png_bytes(56, 56, 61), png_bytes(56, 56, 62)]
    with VitCacheClient(server.target) as client:
        missing = client.fetch([digest_file(images[0])])[0]
        assert missing.error is not None and missing.error.code == grpc.StatusCode.NOT_FOUND
        client.encode(images[:1])
        client._stub = pb_grpc.VitCacheStub(grpc.intercept_channel(client._channel, Record()))
        results = client.encode(images)
    assert [r.source for r in results] == ["L1", "COMPUTED"]
    digests_only, upload = sent
    assert all(image.WhichOneof("source") == "digest" for image in digests_only.images)
    assert [image.encoded for image in upload.images] == [images[1]]


def test_single_flight_computes_a_popular_image_once(server) -> None:  # type: ignore[no-untyped-def]
    image = png_bytes(84, 84, 71)

    def one_request(results: list, i: int) -> None:
        with VitCacheClient(server.target) as client:
            results[i] = client.encode([image])[0]

    results: list = [None] * 8
    threads = [threading.Thread(target=one_request, args=(results, i)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(r.ok for r in results)
    assert len({r.embeddings[0].numpy().tobytes() for r in results}) == 1
    stats = VitCacheClient(server.target).stats()
    assert stats.images_computed == 1


def test_out_of_memory_splits_the_batch_and_fails_only_the_image_that_cannot_fit(
    start_server_thread, tiny_checkpoint
) -> None:  # type: ignore[no-untyped-def]
    encoder = load_encoder(ModelConfig(str(tiny_checkpoint)))
    real_forward = encoder.forward_packed
    seen_batches: list[int] = []

    def forward_with_small_memory(pixel_values, grid_thw):  # type: ignore[no-untyped-def]
        seen_batches.append(len(grid_thw))
        if pixel_values.shape[0] > 400:  # simulated device memory: 400 patches
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return real_forward(pixel_values, grid_thw)

    encoder.forward_packed = forward_with_small_memory  # type: ignore[method-assign]
    srv = start_server_thread(config(max_batch_patches=4096, max_batch_wait_s=0.2), encoder)
    images = [png_bytes(224, 224, 80 + i) for i in range(4)]  # 256 patches each
    huge = png_bytes(420, 420, 90)  # more than 400 patches alone
    with VitCacheClient(srv.target) as client:
        results = client.encode([*images, huge])
        stats = client.stats()
    assert all(r.ok for r in results[:4]), [r.error for r in results]
    assert results[4].error is not None and results[4].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stats.oom_splits >= 1 and max(seen_batches) == 5 and stats.images_computed == 4


def test_async_client_health_and_reflection(server) -> None:  # type: ignore[no-untyped-def]
    async def run() -> list:
        async with AsyncVitCacheClient(server.target) as client:
            first = await client.encode([png_bytes(56, 56, 91), np.full((56, 84, 3), 9, np.uint8)])
            second = await client.encode([png_bytes(56, 56, 91)])
            info = await client.model_info()
            return [first, second, info]

    first, second, info = asyncio.run(run())
    assert [r.source for r in first] == ["COMPUTED", "COMPUTED"] and second[0].source == "L1"
    assert info.family == "qwen2_5_vl" and len(info.namespace) == 32 and info.outputs[0].name == "merged"
    assert first[1].embeddings[0].shape[1] == info.outputs[0].hidden_size
    channel = grpc.insecure_channel(server.target)
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="vitcache.v1.VitCache"))
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    answer = next(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in answer.list_services_response.service}
    assert {"vitcache.v1.VitCache", "grpc.health.v1.Health"} <= names
    channel.close()


def test_reflection_answers_as_v1_and_v1alpha(server) -> None:  # type: ignore[no-untyped-def]
    """grpcurl and other current tools ask for grpc.reflection.v1 first; older ones know only v1alpha."""
    channel = grpc.insecure_channel(server.target)
    # v1alpha: grpcio-reflection's own client builds the service from what the server sends.
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    assert {"Encode", "Fetch", "GetStats"} <= {m.name for m in pool.FindServiceByName("vitcache.v1.VitCache").methods}
    # v1: v1alpha's messages (v1 has the same fields and numbers) under v1's service name.
    v1 = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    asked = ["vitcache.v1.VitCache", "grpc.reflection.v1.ServerReflection"]
    requests = [reflection_pb2.ServerReflectionRequest(list_services="")]
    requests += [reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol) for symbol in asked]
    listed, *described = v1(iter(requests), timeout=30)
    assert {s.name for s in listed.list_services_response.service} >= {
        "vitcache.v1.VitCache",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    files = {}
    for answer in described:
        for serialized in answer.file_descriptor_response.file_descriptor_proto:
            proto = descriptor_pb2.FileDescriptorProto.FromString(serialized)
            files[proto.package] = proto
    assert [s.name for s in files["vitcache.v1"].service] == ["VitCache"]
    (method,) = files["grpc.reflection.v1"].service[0].method
    assert (method.input_type, method.output_type) == (
        ".grpc.reflection.v1.ServerReflectionRequest",
        ".grpc.reflection.v1.ServerReflectionResponse",
    )
    channel.close()


def test_too_many_images_in_one_request_is_rejected(start_server_thread, encoder) -> None:  # type: ignore[no-untyped-def]
    srv = start_server_thread(config(max_images_per_request=2), encoder)
    with VitCacheClient(srv.target) as client, pytest.raises(grpc.RpcError) as err:
        client.encode([png_bytes(28, 28, i) for i in range(3)])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "--max-images-per-request" in err.value.details()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("acceleration", ["varlen", "graphs"])
def test_cuda_service_agrees_with_cpu_and_rejects_bad_files(start_server_thread, tiny_checkpoint, acceleration) -> None:  # type: ignore[no-untyped-def]
    """The GPU path (batched nvJPEG, side streams, varlen attention, pinned copies) end to end:
    in this process with varlen attention, and in an encoder process with CUDA graphs."""
    cpu = load_encoder(ModelConfig(str(tiny_checkpoint), "cpu", "float32"))
    images = [jpeg_bytes(336, 224, 1), jpeg_bytes(448, 448, 2), png_bytes(120, 90, 3), b"\xff\xd8\xff\xe0garbage"]
    if acceleration == "graphs":
        settings = {"device": "cuda", "dtype": "bfloat16", "acceleration": "graphs", "encoder_process": True}
        srv = start_server_thread(config(model=str(tiny_checkpoint), **settings))
        assert isinstance(srv.engine.pipeline, EncoderPool)
    else:
        srv = start_server_thread(
            config(), load_encoder(ModelConfig(str(tiny_checkpoint), "cuda", "bfloat16", acceleration="varlen"))
        )
    ref = start_server_thread(config(), cpu)
    with VitCacheClient(srv.target) as client, VitCacheClient(ref.target) as reference:
        got, want = client.encode(images), reference.forward(images)
    for g, w in zip(got[:3], want[:3], strict=True):
        assert g.ok and w.ok and g.grid_thw == w.grid_thw and g.embeddings[0].dtype == torch.bfloat16
        # bf16 weights and activations, nvJPEG vs Pillow decoding: close in direction, token by token.
        cosine = torch.nn.functional.cosine_similarity(g.embeddings[0].float(), w.embeddings[0], dim=-1)
        assert cosine.mean() > 0.995 and cosine.min() > 0.98, cosine
    assert got[3].error is not None and got[3].error.code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_compressed_request_is_refused_before_it_is_inflated(server) -> None:  # type: ignore[no-untyped-def]
    """0.2 MB of gzip inflates to 200 MiB; the server takes uncompressed requests only."""
    channel = grpc.insecure_channel(server.target)
    stub = pb_grpc.VitCacheStub(channel)
    bomb = pb.EncodeRequest(images=[pb.Image(raw=pb.RawImage(rgb=bytes(8 << 20), height=2048, width=1366))])
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Encode(bomb, compression=grpc.Compression.Gzip, timeout=30))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED and "gzip" in err.value.details()
    assert stub.GetStats(pb.GetStatsRequest()).images_computed == 0
    plain = list(stub.Encode(pb.EncodeRequest(images=[pb.Image(encoded=png_bytes(56, 56, 5))]), timeout=30))
    assert plain[0].error_code == 0 and plain[0].source == pb.COMPUTED
    channel.close()
