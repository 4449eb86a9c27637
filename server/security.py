"""Who may call the server, as which tenant, and over what transport.

- TLS / mutual TLS: :func:`server_credentials` (``--tls-cert``, ``--tls-key``, ``--tls-client-ca``).
- Bearer tokens: ``authorization: Bearer <token>`` checked by :class:`AuthInterceptor` against
  ``--auth-token-file``; the health service stays open so load balancers can probe.
- Tenants: ``x-vitcache-tenant`` scopes every cache key (L1 and L2). A token may be bound to
  one tenant; then its caller is that tenant whatever the metadata says.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from vitcache.server.status import status_code

from vitcache.errors import ErrorCode

TENANT_HEADER = "x-vitcache-tenant"
AUTHORIZATION_HEADER = "authorization"
_TENANT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_OPEN_SERVICE_PREFIX = "/grpc.health.v1.Health/"

Metadata = Sequence[tuple[str, str | bytes]] | None


class AccessDenied(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _fingerprint(token: str) -> bytes:
    # Looked up by hash, so lookup time says nothing about how much of a guess was right.
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class Access:
    """The token table (empty: no authentication) and the rule that picks a request's tenant.

    Token file: one token per line, optionally followed by the tenant it is bound to;
    blank lines and ``#`` comments are ignored. A token without a tenant may name any
    tenant in the metadata (a trusted gateway serving many tenants).
    """

    tokens: dict[bytes, str | None]

    @classmethod
    def open(cls) -> Access:
        return cls({})

    @classmethod
    def from_token_file(cls, path: str | Path) -> Access:
        tokens: dict[bytes, str | None] = {}
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            if len(fields) > 2 or (len(fields) == 2 and not _TENANT_NAME.fullmatch(fields[1])):
                raise ValueError(f"{path}:{number}: expected 'TOKEN [TENANT]' with TENANT of [A-Za-z0-9._-]{{1,64}}")
            tokens[_fingerprint(fields[0])] = fields[1] if len(fields) == 2 else None
        if not tokens:
            raise ValueError(f"{path}: no tokens")
        return cls(tokens)

    @property
    def requires_token(self) -> bool:
        return bool(self.tokens)

    def tenant(self, metadata: Metadata) -> str:
        """The caller's tenant ("" for none); raises AccessDenied for a missing or wrong token."""
        headers = {key: value for key, value in metadata or () if isinstance(value, str)}
        asked = headers.get(TENANT_HEADER, "")
        if asked and not _TENANT_NAME.fullmatch(asked):
            raise AccessDenied(ErrorCode.INVALID_ARGUMENT, f"{TENANT_HEADER} must match [A-Za-z0-9._-]{{1,64}}")
        if not self.requires_token:
            return asked
        scheme, _, token = headers.get(AUTHORIZATION_HEADER, "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise AccessDenied(ErrorCode.UNAUTHENTICATED, "missing 'authorization: Bearer <token>' metadata")
        fingerprint = _fingerprint(token.strip())
        if fingerprint not in self.tokens:
            raise AccessDenied(ErrorCode.UNAUTHENTICATED, "unknown token")
        bound = self.tokens[fingerprint]
        if bound is None:
            return asked
        if asked and asked != bound:
            raise AccessDenied(ErrorCode.PERMISSION_DENIED, f"this token may not act as tenant {asked!r}")
        return bound


def _refusal(handler: grpc.RpcMethodHandler, denied: AccessDenied) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that answers ``denied``'s status.

    Streaming responses get an async generator, like the servicer's own methods, so other
    interceptors that wrap handlers see the same shapes.
    """

    async def refuse(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(status_code(denied.code), denied.message)

    async def refuse_stream(request: object, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        await context.abort(status_code(denied.code), denied.message)
        yield  # never reached; makes this an async generator

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            refuse_stream, handler.request_deserializer, handler.response_serializer
        )
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, handler.request_deserializer, handler.response_serializer)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            refuse_stream, handler.request_deserializer, handler.response_serializer
        )
    return grpc.unary_unary_rpc_method_handler(refuse, handler.request_deserializer, handler.response_serializer)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call but health checks whose metadata :class:`Access` does not accept."""

    def __init__(self, access: Access) -> None:
        self.access = access

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_OPEN_SERVICE_PREFIX):
            return handler
        try:
            self.access.tenant(handler_call_details.invocation_metadata)
        except AccessDenied as denied:
            return _refusal(handler, denied)
        return handler


def server_credentials(cert_file: str, key_file: str, client_ca_file: str | None) -> grpc.ServerCredentials:
    """TLS with the server's certificate; with ``client_ca_file``, clients must present a certificate it signed."""
    client_ca = Path(client_ca_file).read_bytes() if client_ca_file else None
    return grpc.ssl_server_credentials(
        [(Path(key_file).read_bytes(), Path(cert_file).read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )
