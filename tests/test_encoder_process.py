"""The encoder in a child process: same embeddings as in process, the ring, errors, a dying child."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from vitcache.client import FleetClient, VitCacheClient
from vitcache.client.fleet import rendezvous_order
from vitcache.server.metrics import ServerMetrics

from tests.conftest import jpeg_bytes, png_bytes, solid_png
from vitcache.cache.l1 import L1Cache
from vitcache.config import BatchingConfig, ModelConfig, VitcacheConfig
from vitcache.encode.encoder_pool import EncoderPool
from vitcache.encode.encoder_process import EncoderProcess
from vitcache.encode.pipeline import PipelineConfig
from vitcache.engine import EmbeddingEngine, EncodedFile
from vitcache.errors import ErrorCode
from vitcache.models.loading import EncoderLoader, VisionEncoder
from vitcache.models.preprocess import preprocess
from vitcache.outcomes import ImageOutcome, Source

# 40x40 images: 2 x 2 tokens of 64 floats = 1 KiB per embedding on the tiny model.
IMAGES = [png_bytes(40 + 28 * (i % 3), 40, seed=i) for i in range(24)]


async def encode_all(engine: EmbeddingEngine, images: list[bytes]) -> dict[int, ImageOutcome]:
    return {o.index: o async for o in engine.encode([EncodedFile(data) for data in images])}


def run_engine(pipeline: EncoderProcess | VisionEncoder, images: list[bytes], **engine_kw) -> dict[int, ImageOutcome]:
    async def run() -> dict[int, ImageOutcome]:
        engine = EmbeddingEngine(pipeline, L1Cache(64 << 20), **engine_kw)
        await engine.start()
        try:
            # Several concurrent requests, so batches mix images of different requests.
            parts = await asyncio.gather(*(encode_all(engine, images[i::4]) for i in range(4)))
            return {4 * index + i: outcome for i, part in enumerate(parts) for index, outcome in part.items()}
        finally:
            await engine.stop()

    return asyncio.run(run())


def assert_same_embeddings(got: dict[int, ImageOutcome], want: dict[int, ImageOutcome]) -> None:
    assert sorted(got) == sorted(want)
    for index, outcome in got.items():
        assert outcome.error is None, outcome.error
        assert outcome.entry.grid_thw == want[index].entry.grid_thw
        for a, b in zip(outcome.entry.tensors(), want[index].entry.tensors(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def in_process(encoder: VisionEncoder) -> dict[int, ImageOutcome]:
    return run_engine(encoder, IMAGES)


def test_child_computes_what_the_encoder_computes_in_process(tiny_checkpoint: Path, in_process, encoder) -> None:
    metrics = ServerMetrics()
    process = EncoderProcess(
        EncoderLoader(ModelConfig(str(tiny_checkpoint))),
        pipeline=PipelineConfig(BatchingConfig(max_batch_patches=64)),
        observer=metrics,
    )
    got = run_engine(process, IMAGES, observer=metrics)
    assert_same_embeddings(got, in_process)
    assert all(o.source is Source.COMPUTED for o in got.values())
    assert process.spec == encoder.spec  # the parent learns the model from the child
    # The child's forwards reach the parent's stats and metrics.
    assert process.stats.images == len(IMAGES) and process.stats.batches > 1
    assert metrics.registry.get_sample_value("vitcache_batch_size_images_sum") == len(IMAGES)
    assert metrics.registry.get_sample_value("vitcache_batch_size_images_count") == process.stats.batches
    preprocessed = metrics.registry.get_sample_value("vitcache_stage_duration_seconds_count", {"stage": "preprocess"})
    assert preprocessed == len(IMAGES)


def test_ring_wraps_and_oversized_entries_travel_through_the_pipe(tiny_checkpoint: Path, in_process) -> None:
    # Embeddings of 512 to 1024 bytes through a ring with room for two: what finds it full travels
    # through the pipe, and five or more through the ring (2.5 KiB or more) means it wrapped.
    small_ring = EncoderProcess(
        EncoderLoader(ModelConfig(str(tiny_checkpoint))),
        pipeline=PipelineConfig(BatchingConfig(max_batch_patches=32)),
        ring_bytes=2100,
    )
    assert_same_embeddings(run_engine(small_ring, IMAGES), in_process)
    assert small_ring.through_ring >= 5
    assert small_ring.through_ring + small_ring.through_pipe == len(IMAGES)
    # Smaller than any embedding: every one travels through the pipe.
    no_ring = EncoderProcess(EncoderLoader(ModelConfig(str(tiny_checkpoint))), ring_bytes=256)
    assert_same_embeddings(run_engine(no_ring, IMAGES[:6]), {i: in_process[i] for i in range(6)})
    assert (no_ring.through_ring, no_ring.through_pipe) == (0, 6)


def test_bad_image_fails_alone_and_a_dead_child_fails_misses_not_hits(tiny_checkpoint: Path, in_process) -> None:
    async def run() -> None:
        process = EncoderProcess(EncoderLoader(ModelConfig(str(tiny_checkpoint))))
        engine = EmbeddingEngine(process, L1Cache(64 << 20))
        await engine.start()
        try:
            got = await encode_all(engine, [IMAGES[0], b"not an image", IMAGES[1]])
            assert got[1].error is not None and got[1].error.code is ErrorCode.INVALID_ARGUMENT
            assert got[0].error is None and got[2].error is None
            torch.testing.assert_close(got[0].entry.tensors()[0], in_process[0].entry.tensors()[0])

            os.kill(process.pid, signal.SIGKILL)
            for _ in range(100):
                got = await encode_all(engine, [IMAGES[0], IMAGES[5]])
                if got[1].error is not None:
                    break
                await asyncio.sleep(0.05)  # the reply may have been on its way
            assert got[1].error.code is ErrorCode.UNAVAILABLE and "encoder process exited" in got[1].error.message
            assert got[0].source is Source.L1  # cached answers are unaffected
        finally:
            await engine.stop()

    asyncio.run(run())


def test_server_with_encoder_process(tiny_checkpoint: Path, start_server_thread, in_process, encoder) -> None:
    budget = 3_000_000  # decoded pixels in flight
    server = start_server_thread(
        VitcacheConfig.of(
            model=str(tiny_checkpoint),
            encoder_process=True,
            encoder_ring_bytes=1 << 20,
            encoder_restart_backoff_s=3600.0,  # no restart within the test: a server whose only encoder is gone
            max_decoded_pixels_in_flight=budget,
        )
    )
    pool = server.engine.pipeline
    assert isinstance(pool, EncoderPool) and pool.ring_bytes == 1 << 20
    with VitCacheClient(server.target) as client, grpc.insecure_channel(server.target) as channel:
        assert client.model_info().model == str(tiny_checkpoint)
        results = client.encode([IMAGES[3], jpeg_bytes(64, 48, seed=1), b"junk"])
        assert results[2].error is not None and results[2].error.code.name == "INVALID_ARGUMENT"
        torch.testing.assert_close(results[0].embeddings[0], in_process[3].entry.tensors()[0], rtol=1e-4, atol=1e-5)
        assert results[1].ok and results[1].source == "COMPUTED"
        assert client.stats().images_computed == 2

        # The child decodes and preprocesses: the decoded pixel budget and the finite check are its pipeline's.
        # Two images of 2.25M pixels do not fit at once; one of 4M never does.
        large = client.encode([solid_png(1500, 1500, 1), solid_png(1500, 1500, 2), solid_png(2000, 2000, 3)])
        assert large[0].ok and large[1].ok
        assert large[2].error is not None and large[2].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert 1500 * 1500 <= pool.stats.decoded_pixels_peak <= budget
        valid, grid = preprocess(np.full((56, 56, 3), 90, dtype=np.uint8), pool.spec.preprocess_config)
        nan = valid.clone()
        nan[3, 3] = float("nan")
        for _ in range(2):  # the second time not from a cache either
            nan_result, valid_result = client.encode_pixels(torch.cat([nan, valid]), [grid, grid])
            assert nan_result.error is not None and nan_result.error.code == grpc.StatusCode.INVALID_ARGUMENT
            assert valid_result.ok and valid_result.embeddings[0].isfinite().all()

        # Its encoder gone, the server says so to health checks, fails misses and still serves hits.
        health = health_pb2_grpc.HealthStub(channel)
        os.kill(pool.pids[0], signal.SIGKILL)
        for _ in range(200):
            status = health.Check(health_pb2.HealthCheckRequest(service="vitcache.v1.VitCache")).status
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            time.sleep(0.05)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        results = client.encode([IMAGES[3], IMAGES[4]])
        assert results[0].source == "L1"
        assert results[1].error is not None and results[1].error.code == grpc.StatusCode.UNAVAILABLE

    # A fleet sends the images this replica cannot compute to the next replica.
    other = start_server_thread(VitcacheConfig.of(), encoder)
    with FleetClient([server.target, other.target]) as fleet:
        results = fleet.encode(IMAGES[8:16])
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    first_choice = [rendezvous_order(r.digest, [server.target, other.target])[0] for r in results]
    assert 0 < first_choice.count(0) < len(results)  # both replicas were some images' first choice
    for result, want in zip(results, range(8, 16), strict=True):
        torch.testing.assert_close(result.embeddings[0], in_process[want].entry.tensors()[0], rtol=1e-4, atol=1e-5)
    assert other.engine.stats.misses == len(results)
