"""The gRPC server (with health and reflection, v1 and v1alpha), the metrics port and the shm socket
around the engine :func:`vitcache.build.build_engine` makes."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal

import grpc
from grpc_health.v1 import health

from vitcache.build import build_engine
from vitcache.config import VitcacheConfig
from vitcache.encode.encoder_pool import EncoderPool
from vitcache.engine import EmbeddingEngine
from vitcache.models.loading import VisionEncoder

from .frontends.supervisor import FrontendProcesses
from .grpc_server import SERVICE_NAME, grpc_server, set_health
from .metrics import ServerMetrics
from .ports import check_port_free
from .security import Access, MetricsAccess
from .shm import ShmServer
from .web import MetricsHttpServer

log = logging.getLogger(__name__)


class RunningServer:
    """A started server; ``port`` is the bound port (useful with ``port=0``), ``metrics_port`` likewise.
    With ``--frontends``, ``frontends`` serve gRPC and ``server`` is None."""

    def __init__(
        self,
        engine: EmbeddingEngine,
        port: int,
        server: grpc.aio.Server | None = None,
        health: health.aio.HealthServicer | None = None,
        frontends: FrontendProcesses | None = None,
        metrics: ServerMetrics | None = None,
        metrics_http: MetricsHttpServer | None = None,
        shm: ShmServer | None = None,
    ):
        self.engine = engine
        self.port = port
        self.server = server
        self.health = health
        self.frontends = frontends
        self.metrics = metrics
        self.metrics_http = metrics_http
        self.metrics_port = metrics_http.port if metrics_http else None
        self.shm = shm

    async def stop(self, grace_s: float = 5.0) -> None:
        if self.frontends is not None:
            await self.frontends.stop(grace_s)
        if self.server is not None and self.health is not None:
            await self.health.enter_graceful_shutdown()
            await self.server.stop(grace_s)
        if self.shm is not None:
            await self.shm.stop()
        await self.engine.stop()
        if self.metrics_http is not None:
            self.metrics_http.stop()


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
    if access.requires_token:
        engine.count_by_tenant()  # GetStats answers each tenant with its own counts
    await engine.start()

    server = health_servicer = frontends = None
    if transport.frontends:
        frontends = FrontendProcesses(config, engine, metrics)
        port = await frontends.start()
        on_health = frontends.set_serving
    else:
        server, health_servicer, port = await grpc_server(
            config, engine, access, metrics.interceptor(SERVICE_NAME), transport.port
        )
        await set_health(health_servicer, True)
        on_health = functools.partial(set_health, health_servicer)
    pipeline = engine.pipeline
    if isinstance(pipeline, EncoderPool):
        # Without any encoder a server still answers hits, but it can compute nothing: let the
        # orchestrator (or a FleetClient's health checks) route around it until one is back.
        pipeline.on_unavailable = lambda: on_health(False)
        pipeline.on_available = lambda: on_health(True)
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
        "serving %s (%s, %s on %s, namespace %s) on %s:%d%s; L2 %s",
        served.model.model,
        served.model.family,
        served.model.dtype,
        served.model.device,
        served.model.namespace,
        transport.host,
        port,
        f" ({transport.frontends} front-end processes)" if transport.frontends else "",
        "redis" if served.l2.enabled else "off",
    )
    shm = None
    if transport.shm_socket:
        shm = ShmServer(
            engine, transport.shm_socket, transport.shm_arena_bytes, config.limits.max_images_per_request, access
        )
        await shm.start()
    return RunningServer(engine, port, server, health_servicer, frontends, metrics, metrics_http, shm)


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
