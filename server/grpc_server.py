"""The gRPC server of the VitCache service, as a server without front-ends and each front-end run it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from vitcache.v1 import vitcache_pb2 as pb

from vitcache.config import VitcacheConfig

from .ports import GRPC_OPTIONS, add_grpc_port
from .reflection import enable_reflection
from .security import Access, AuthInterceptor, server_credentials
from .service import VitCacheServicer
from .wire import add_servicer

if TYPE_CHECKING:
    from vitcache.engine import EmbeddingEngine

    from .frontends.frontend import RemoteEngine

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["VitCache"].full_name


async def grpc_server(
    config: VitcacheConfig,
    engine: EmbeddingEngine | RemoteEngine,
    access: Access,
    metrics_interceptor: grpc.aio.ServerInterceptor,
    port: int,
    reuse_port: bool = False,
) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """The VitCache service (and health, reflection) on ``engine``, started on ``port``; the bound port.
    ``reuse_port``: share the port with the other front-ends of this server (the kernel spreads connections)."""
    transport, security = config.transport, config.security
    server = grpc.aio.server(
        interceptors=[metrics_interceptor, AuthInterceptor(access)],
        options=[
            ("grpc.max_receive_message_length", config.limits.max_request_bytes),
            ("grpc.max_send_message_length", -1),
            *(GRPC_OPTIONS if not reuse_port else [("grpc.so_reuseport", 1)]),
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
        port = add_grpc_port(server, transport.host, port, credentials)
    else:
        port = add_grpc_port(server, transport.host, port)
    await server.start()
    return server, health_servicer, port


async def set_health(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    """SERVING or NOT_SERVING for the server as a whole and for the VitCache service alike."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)
