"""One encoder process per device: work spread over all, a dying one costs no image, it comes back."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import generate_latest
from vitcache.client import VitCacheClient

from tests.conftest import png_bytes
from vitcache.config import ModelConfig, VitcacheConfig
from vitcache.encode.encoder_pool import EncoderPool, parse_devices
from vitcache.errors import ConfigError


def test_parse_devices() -> None:
    assert parse_devices("cpu") == ["cpu"]
    assert parse_devices("cuda:1") == ["cuda:1"]
    assert parse_devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"]
    assert parse_devices("cuda", cuda_count=lambda: 3) == ["cuda:0", "cuda:1", "cuda:2"]
    assert parse_devices("all", cuda_count=lambda: 2) == ["cuda:0", "cuda:1"]
    assert parse_devices("cpu,cpu") == ["cpu", "cpu"]  # two CPU encoders: how the tests run a pool
    for bad, words in [
        ("all", "no CUDA device"),
        ("cuda:0,cuda:0", "each GPU once"),
        ("cpu,cuda:0", "do not mix"),
        ("gpu", "is not cpu, cuda or cuda:N"),
        ("cuda:x", "is not cpu, cuda or cuda:N"),
        ("", "empty"),
    ]:
        with pytest.raises(ConfigError, match=words):
            parse_devices(bad, cuda_count=lambda: 0)


ROUNDS = 8


def _wait(predicate, seconds: float = 60.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_pool_spreads_work_survives_a_dead_encoder_and_restarts_it(tiny_checkpoint: Path, start_server_thread) -> None:
    server = start_server_thread(
        VitcacheConfig.of(
            model=str(tiny_checkpoint), device="cpu,cpu", encoder_process=True, encoder_restart_backoff_s=0.2
        )
    )
    pool = server.engine.pipeline
    assert isinstance(pool, EncoderPool) and pool.live == 2 and len(set(pool.pids)) == 2
    results: list = []
    errors: list = []

    def load(worker: int) -> None:
        with VitCacheClient(server.target) as client:
            for round_ in range(ROUNDS):
                images = [png_bytes(40 + 28 * (i % 3), 40, seed=10_000 * worker + 10 * round_ + i) for i in range(3)]
                try:
                    results.extend(client.encode(images, hash_first=False, timeout=120))
                except grpc.RpcError as exc:
                    errors.append(exc)

    workers = [threading.Thread(target=load, args=(w,)) for w in range(4)]
    for worker in workers:
        worker.start()
    assert _wait(lambda: len(results) >= 12)  # both encoders are busy by now
    victim = pool.pids[0]
    os.kill(victim, signal.SIGKILL)  # under load: its in-flight images must be computed on the other
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert _wait(lambda: pool.live == 1, 30)
        status = health.Check(health_pb2.HealthCheckRequest(service="vitcache.v1.VitCache")).status
        assert status == health_pb2.HealthCheckResponse.SERVING  # one encoder is left
    for worker in workers:
        worker.join(300)
    assert not errors and len(results) == 4 * ROUNDS * 3
    failed = [r.error for r in results if not r.ok]
    assert not failed, failed

    # The dead encoder comes back (a new process) and takes work again; stats show both and the restart.
    assert _wait(lambda: pool.live == 2, 120)
    assert victim not in pool.pids
    with VitCacheClient(server.target) as client:
        before = [e.images for e in client.stats().encoders]
        client.encode([png_bytes(68, 40, seed=99_000 + i) for i in range(8)], hash_first=False)
        encoders = client.stats().encoders
    assert [e.device for e in encoders] == ["cpu#0", "cpu#1"]
    assert [e.alive for e in encoders] == [True, True]
    assert [e.restarts for e in encoders] == [1, 0]
    assert encoders[0].images > before[0], (before, encoders)  # the restarted process takes work again
    exposed = generate_latest(server.running.metrics.registry).decode()
    assert 'vitcache_encoder_restarts_total{gpu="cpu#0"} 1.0' in exposed
    assert 'vitcache_encoder_alive{gpu="cpu#1"} 1.0' in exposed
    assert f'vitcache_encoder_images_total{{gpu="cpu#1"}} {float(encoders[1].images)}' in exposed


def test_an_encoder_process_sees_only_its_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from vitcache.encode.encoder_process import _sees_only_its_gpu
    from vitcache.models.loading import EncoderLoader

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    loader, visible = _sees_only_its_gpu(EncoderLoader(ModelConfig("m", "cuda:1")))
    assert (loader.device, visible) == ("cuda:0", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4, 6")  # the server itself was given GPUs 4 and 6
    assert _sees_only_its_gpu(EncoderLoader(ModelConfig("m", "cuda:1")))[1] == "6"
    assert _sees_only_its_gpu(EncoderLoader(ModelConfig("m", "cpu"))) == (EncoderLoader(ModelConfig("m", "cpu")), None)


def test_an_image_under_which_two_encoders_die_fails_internal_and_is_not_tried_again(tiny_checkpoint: Path) -> None:
    """An image that kills encoders (say, a decoder crash) costs at most two of them, and fails
    INTERNAL, not UNAVAILABLE, so a fleet client does not carry it on to the next replica."""
    import asyncio

    from vitcache.cache.l1 import L1Cache
    from vitcache.config import BatchingConfig
    from vitcache.encode.pipeline import PipelineConfig
    from vitcache.engine import EmbeddingEngine, EncodedFile
    from vitcache.errors import ErrorCode
    from vitcache.models.loading import EncoderLoader

    async def run() -> tuple[ErrorCode | None, int]:
        # Batches wait 4 s to fill: the image sits in each child while the test kills it.
        pool = EncoderPool(
            [EncoderLoader(ModelConfig(str(tiny_checkpoint)))] * 3,
            PipelineConfig(BatchingConfig(max_batch_wait_s=4.0)),
            restart_backoff_s=3600.0,
        )
        engine = EmbeddingEngine(pool, L1Cache(1 << 20))
        await engine.start()
        try:
            outcome = asyncio.ensure_future(anext(engine.encode([EncodedFile(png_bytes(40, 40, seed=7))])))
            for _ in range(2):
                await asyncio.sleep(1.0)
                (busy,) = [slot.process.pid for slot in pool._slots if slot.alive and slot.in_flight]
                os.kill(busy, signal.SIGKILL)
            error = (await asyncio.wait_for(outcome, 60)).error
            # Asked again, it fails at once from the engine's memory: the last encoder is not sent it.
            survivor = [slot.process.pid for slot in pool._slots if slot.alive]
            (again,) = [o async for o in engine.encode([EncodedFile(png_bytes(40, 40, seed=7))])]
            assert again.error is not None and again.error.code is ErrorCode.INTERNAL
            assert "earlier try" in again.error.message
            assert [slot.process.pid for slot in pool._slots if slot.alive] == survivor
            assert all(slot.in_flight == 0 for slot in pool._slots)
            return (error.code if error else None), pool.live
        finally:
            await engine.stop()

    code, live = asyncio.run(run())
    assert code is ErrorCode.INTERNAL
    assert live == 1  # the third encoder was never sent the image
