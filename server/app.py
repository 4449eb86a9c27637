"""The gRPC server (with health and reflection, v1 and v1alpha), the metrics port and the shm socket
around the engine :func:`vitcache.build.build_engine` makes."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from vitcache.v1 import vitcache_pb2 as pb

from vitcache.build import build_engine
from vitcache.config import VitcacheConfig
from vitcache.encode.encoder_pool import EncoderPool
from vitcache.engine import EmbeddingEngine
from vitcache.models.loading import VisionEncoder

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


async def start_server(config: VitcacheConfig, encoder: VisionEncoder | None = None) -> RunningServer:
    """Serves the engine :func:`build_engine` makes of ``config`` (with ``encoder``, if given) over gRPC,
    and the metrics port and shared-memory socket if configured."""
    transport, security, metrics_config = config.transport, config.security, config.metrics
    # Mistakes an operator can see before the model loads, which takes a while.
    check_port_free(transport.host, transport.port, "--port")
    if metrics_config.metrics_port:
        check_port_free(metrics_config.metrics_host, metrics_config.metrics_port, "--metrics-port")
    access = Access.from_token_file(security.auth_token_file) if security.auth_token_file else Access.open()
    metrics_access = MetricsAccess.build(access, security.metrics_token_file)
    metrics = ServerMetrics()
    engine = await build_engine(config, encoder, observer=metrics)
    metrics.watch(engine)
    await engine.start()

    server = grpc.aio.server(
        interceptors=[metrics.interceptor(SERVICE_NAME), AuthInterceptor(access)],
        options=[
            ("grpc.max_receive_message_length", config.limits.max_request_bytes),
            ("grpc.max_send_message_length", -1),
            *GRPC_OPTIONS,
            # Identity only: a compressed request is refused (UNIMPLEMENTED) before it is inflated. gRPC
            # bounds an inflated message by max_receive_message_length alone, so 0.2 MB of gzip could
            # make 200 MiB; images and pixel values hardly compress, so clients lose nothing.
            ("grpc.compression_enabled_algorithms_bitset", 1),
        ],
    )
    add_servicer(VitCacheServicer(engine, config.limits.max_images_per_request, access), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection((SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), server)
    if security.tls_cert and security.tls_key:  # both or neither: SecurityConfig checks
        credentials = server_credentials(security.tls_cert, security.tls_key, security.tls_client_ca)
        port = add_grpc_port(server, transport.host, transport.port, credentials)
    else:
        port = add_grpc_port(server, transport.host, transport.port)
    await server.start()
    await _set_health(health_servicer, health_pb2.HealthCheckResponse.SERVING)
    pipeline = engine.pipeline
    if isinstance(pipeline, EncoderPool):
        # Without any encoder a server still answers hits, but it can compute nothing: let the
        # orchestrator (or a FleetClient's health checks) route around it until one is back.
        pipeline.on_unavailable = lambda: _set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
        pipeline.on_available = lambda: _set_health(health_servicer, health_pb2.HealthCheckResponse.SERVING)
    metrics_http = None
    if metrics_config.metrics_port is not None:
        metrics_http = MetricsHttpServer(
            metrics, metrics_config.metrics_host, metrics_config.metrics_port, metrics_access
        )
        log.info("metrics and dashboard on http://%s:%d/", metrics_config.metrics_host, metrics_http.port)
        if metrics_access.locked:
            log.warning(
                "every --auth-token-file token is bound to a tenant, so none may read /metrics and /api/stats: "
                "give Prometheus and operators tokens with --metrics-token-file"
            )
    served = engine.snapshot()
    log.info(
        "serving %s (%s, %s on %s, namespace %s) on %s:%d; L2 %s",
        served.model.model,
        served.model.family,
        served.model.dtype,
        served.model.device,
        served.model.namespace,
        transport.host,
        port,
        "redis" if served.l2.enabled else "off",
    )
    shm = None
    if transport.shm_socket:
        shm = ShmServer(
            engine, transport.shm_socket, transport.shm_arena_bytes, config.limits.max_images_per_request, access
        )
        await shm.start()
    return RunningServer(server, engine, health_servicer, port, metrics, metrics_http, shm)


async def _set_health(health_servicer: health.aio.HealthServicer, status: int) -> None:
    """``status`` for the server as a whole and for the VitCache service alike."""
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)


async def serve_forever(config: VitcacheConfig) -> None:
    running = await start_server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"vitcache listening on {config.transport.host}:{running.port}", flush=True)
    await stop.wait()
    log.info("shutting down")
    await running.stop()
