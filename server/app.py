"""Assembles encoder, tiers, engine and the gRPC server (with health and reflection, v1 and v1alpha)."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from vitcache.v1 import vitcache_pb2 as pb

from vitcache.cache.fleet_lock import FleetLock
from vitcache.cache.l1 import L1Cache
from vitcache.cache.tiers import RedisTier, check_redis_url
from vitcache.encode.encoder_pool import EncoderPool, parse_devices, pool_loaders
from vitcache.encode.pipeline import Pipeline
from vitcache.engine import EmbeddingEngine, EngineConfig
from vitcache.errors import ConfigError
from vitcache.models.loading import EncoderLoader, VisionEncoder

from .metrics import ServerMetrics
from .ports import GRPC_OPTIONS, add_grpc_port, check_port_free
from .reflection import enable_reflection
from .security import Access, AuthInterceptor, MetricsAccess, server_credentials
from .service import VitCacheServicer
from .shm import ShmServer
from .web import MetricsHttpServer
from .wire import add_servicer

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["VitCache"].full_name


@dataclass
class ServerConfig:
    model: str = "tiny-random"
    device: str = "cpu"  # cpu, cuda:N, a list (cuda:0,cuda:1), or cuda / all: every visible GPU
    dtype: str | None = None
    acceleration: str = "auto"
    host: str = "127.0.0.1"
    port: int = 50051
    redis_url: str | None = None
    redis_ttl_s: int | None = None
    redis_timeout_s: float = 0.5
    redis_cluster: bool = False  # redis_url names one seed node of a Redis Cluster
    fleet_lock_ttl_s: float | None = 10.0  # fleet-wide single flight through L2; None = off
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None  # set: mutual TLS, clients need a certificate it signed
    auth_token_file: str | None = None
    # Tokens (one a line) that may read /metrics and /api/stats; so may unbound --auth-token-file tokens.
    metrics_token_file: str | None = None
    l1_bytes: int = 2 << 30
    max_images_per_request: int = 256
    max_request_bytes: int = 256 << 20
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None  # /metrics, /api/stats and the dashboard; None = off, 0 = a free port
    shm_socket: str | None = None  # Unix socket of the same-host shared-memory path; None = off
    shm_arena_bytes: int = 256 << 20  # shared memory each shm client connection may hold
    engine: EngineConfig = field(default_factory=EngineConfig)
    # Decode, preprocessing and the forward in a child process that owns the device, so
    # serving never waits for the GIL of kernel launches (vitcache.encode.encoder_process). None: on for CUDA.
    encoder_process: bool | None = None
    encoder_ring_bytes: int = 512 << 20  # shared memory the encoder process hands embeddings back through
    encoder_restart_backoff_s: float = 1.0  # first wait before a dead encoder process is started again
    # (width, height) of images whose batches are run at load, capturing their CUDA graphs then.
    warmup_image_sizes: tuple[tuple[int, int], ...] = ()

    @property
    def uses_encoder_process(self) -> bool:
        return self.device.startswith(("cuda", "all")) if self.encoder_process is None else self.encoder_process


class RunningServer:
    """A started server; ``port`` is the bound port (useful with ``port=0``), ``metrics_port`` likewise."""

    def __init__(
        self,
        server: grpc.aio.Server,
        engine: EmbeddingEngine,
        health: health.aio.HealthServicer,
        port: int,
        metrics: ServerMetrics | None = None,
        metrics_http: MetricsHttpServer | None = None,
        shm: ShmServer | None = None,
    ):
        self.server = server
        self.engine = engine
        self.health = health
        self.port = port
        self.metrics = metrics
        self.metrics_http = metrics_http
        self.metrics_port = metrics_http.port if metrics_http else None
        self.shm = shm

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        if self.shm is not None:
            await self.shm.stop()
        await self.engine.stop()
        if self.metrics_http is not None:
            self.metrics_http.stop()

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def start_server(config: ServerConfig, encoder: VisionEncoder | None = None) -> RunningServer:
    """Serves ``encoder``; without one, loads ``config.model`` here or in an encoder process."""
    # Mistakes an operator can see before the model loads, which takes a while.
    check_port_free(config.host, config.port, "--port")
    if config.metrics_port:
        check_port_free(config.metrics_host, config.metrics_port, "--metrics-port")
    if config.redis_url:
        check_redis_url(config.redis_url)
    access = Access.from_token_file(config.auth_token_file) if config.auth_token_file else Access.open()
    metrics_access = MetricsAccess.build(access, config.metrics_token_file)
    metrics = ServerMetrics()
    pipeline: VisionEncoder | Pipeline
    if encoder is not None:
        pipeline = encoder
    else:
        devices = parse_devices(config.device)
        loader = EncoderLoader(
            config.model,
            devices[0],
            config.dtype,
            config.acceleration,
            graph_max_patches=config.engine.max_batch_patches,  # every batch the batcher makes has its graph
            warmup_image_sizes=config.warmup_image_sizes,
        )
        if config.uses_encoder_process:
            pipeline = EncoderPool(
                pool_loaders(loader, devices),
                config.engine.pipeline,
                metrics,
                ring_bytes=config.encoder_ring_bytes,
                restart_backoff_s=config.encoder_restart_backoff_s,
            )
            await pipeline.load()  # the namespace (and so the L2 keys) is known once the model is
        elif len(devices) > 1:
            raise ConfigError(f"--device {config.device}: several devices need --encoder-process on (or auto)")
        else:
            pipeline = loader.load()
    namespace = pipeline.spec.namespace
    l2 = fleet_lock = None
    if config.redis_url:
        l2 = RedisTier(
            config.redis_url,
            namespace,
            config.redis_ttl_s,
            config.redis_timeout_s,
            cluster=config.redis_cluster,
        )
        if config.fleet_lock_ttl_s:
            fleet_lock = FleetLock(l2, config.fleet_lock_ttl_s)
    engine = EmbeddingEngine(pipeline, L1Cache(config.l1_bytes), l2, config.engine, fleet_lock, observer=metrics)
    metrics.watch(engine)
    await engine.start()

    server = grpc.aio.server(
        interceptors=[metrics.interceptor(SERVICE_NAME), AuthInterceptor(access)],
        options=[
            ("grpc.max_receive_message_length", config.max_request_bytes),
            ("grpc.max_send_message_length", -1),
            *GRPC_OPTIONS,
            # Identity only: a compressed request is refused (UNIMPLEMENTED) before it is inflated. gRPC
            # bounds an inflated message by max_receive_message_length alone, so 0.2 MB of gzip could
            # make 200 MiB; images and pixel values hardly compress, so clients lose nothing.
            ("grpc.compression_enabled_algorithms_bitset", 1),
        ],
    )
    add_servicer(VitCacheServicer(engine, config.max_images_per_request, access), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection((SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), server)
    if config.tls_cert or config.tls_key:
        if not (config.tls_cert and config.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        credentials = server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
        port = add_grpc_port(server, config.host, config.port, credentials)
    elif config.tls_client_ca:
        raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
    else:
        port = add_grpc_port(server, config.host, config.port)
    await server.start()
    await _set_health(health_servicer, health_pb2.HealthCheckResponse.SERVING)
    if isinstance(pipeline, EncoderPool):
        # Without any encoder a server still answers hits, but it can compute nothing: let the
        # orchestrator (or a FleetClient's health checks) route around it until one is back.
        pipeline.on_unavailable = lambda: _set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
        pipeline.on_available = lambda: _set_health(health_servicer, health_pb2.HealthCheckResponse.SERVING)
    metrics_http = None
    if config.metrics_port is not None:
        metrics_http = MetricsHttpServer(metrics, config.metrics_host, config.metrics_port, metrics_access)
        log.info("metrics and dashboard on http://%s:%d/", config.metrics_host, metrics_http.port)
        if metrics_access.locked:
            log.warning(
                "every --auth-token-file token is bound to a tenant, so none may read /metrics and /api/stats: "
                "give Prometheus and operators tokens with --metrics-token-file"
            )
    log.info(
        "serving %s (%s, %s on %s, namespace %s) on %s:%d; L2 %s",
        engine.spec.model_name,
        engine.spec.family,
        engine.spec.dtype,
        engine.spec.device,
        namespace,
        config.host,
        port,
        "redis" if l2 else "off",
    )
    shm = None
    if config.shm_socket:
        shm = ShmServer(engine, config.shm_socket, config.shm_arena_bytes, config.max_images_per_request, access)
        await shm.start()
    return RunningServer(server, engine, health_servicer, port, metrics, metrics_http, shm)


async def _set_health(health_servicer: health.aio.HealthServicer, status: int) -> None:
    """``status`` for the server as a whole and for the VitCache service alike."""
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)


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
