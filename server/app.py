"""Assembles encoder, tiers, engine and the gRPC server (with health and reflection)."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from vitcache.models import VisionEncoder, load_encoder
from vitcache.v1 import vitcache_pb2 as pb
from vitcache.v1 import vitcache_pb2_grpc as pb_grpc

from vitcache.engine import EmbeddingEngine, EngineConfig
from vitcache.tiers import L1Cache, RedisTier

from .service import VitCacheServicer

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["VitCache"].full_name


@dataclass
class ServerConfig:
    model: str = "tiny-random"
    device: str = "cpu"
    dtype: str | None = None
    host: str = "127.0.0.1"
    port: int = 50051
    redis_url: str | None = None
    redis_ttl_s: int | None = None
    redis_timeout_s: float = 0.5
    l1_bytes: int = 2 << 30
    max_images_per_request: int = 256
    max_request_bytes: int = 256 << 20
    engine: EngineConfig = field(default_factory=EngineConfig)


class RunningServer:
    """A started server; ``port`` is the bound port (useful with ``port=0``)."""

    def __init__(self, server: grpc.aio.Server, engine: EmbeddingEngine, health: health.aio.HealthServicer, port: int):
        self.server = server
        self.engine = engine
        self.health = health
        self.port = port

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        await self.engine.stop()

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def start_server(config: ServerConfig, encoder: VisionEncoder | None = None) -> RunningServer:
    if encoder is None:
        encoder = load_encoder(config.model, config.device, config.dtype)
    l2 = None
    if config.redis_url:
        l2 = RedisTier(config.redis_url, encoder.namespace, config.redis_ttl_s, config.redis_timeout_s)
    engine = EmbeddingEngine(encoder, L1Cache(config.l1_bytes), l2, config.engine)
    await engine.start()

    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", config.max_request_bytes),
            ("grpc.max_send_message_length", -1),
        ]
    )
    pb_grpc.add_VitCacheServicer_to_server(VitCacheServicer(engine, config.max_images_per_request), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "serving %s (%s, %s on %s, namespace %s) on %s:%d; L2 %s",
        encoder.model_name,
        encoder.family,
        encoder.dtype,
        encoder.device,
        encoder.namespace,
        config.host,
        port,
        "redis" if l2 else "off",
    )
    return RunningServer(server, engine, health_servicer, port)


async def serve_forever(config: ServerConfig) -> None:
    running = await start_server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"vitcache listening on {config.host}:{running.port}", flush=True)
    await stop.wait()
    log.info("shutting down")
    await running.stop()
