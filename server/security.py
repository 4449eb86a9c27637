"""Who may call the server, as which tenant, and over what transport.

- TLS / mutual TLS: :func:`server_credentials` (``--tls-cert``, ``--tls-key``, ``--tls-client-ca``).
- Bearer tokens: ``authorization: Bearer <token>`` checked by :class:`AuthInterceptor` against
  ``--auth-token-file``; the health service stays open so load balancers can probe.
- Tenants: ``x-vitcache-tenant`` scopes every cache key (L1 and L2). A token may be bound to
  one tenant; then its caller is that tenant whatever the metadata says.
- The metrics port: :class:`MetricsAccess` (``--metrics-token-file``, unbound tokens).
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


def _read_token_file(path: str | Path, tenants: bool) -> dict[bytes, str | None]:
    """Fingerprint -> bound tenant of each line ``TOKEN [TENANT]`` (``TOKEN`` alone unless ``tenants``)."""
    expected = "'TOKEN [TENANT]' with TENANT of [A-Za-z0-9._-]{1,64}" if tenants else "one TOKEN per line"
    tokens: dict[bytes, str | None] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) > (2 if tenants else 1) or (len(fields) == 2 and not _TENANT_NAME.fullmatch(fields[1])):
            raise ValueError(f"{path}:{number}: expected {expected}")
        tokens[_fingerprint(fields[0])] = fields[1] if len(fields) == 2 else None
    if not tokens:
        raise ValueError(f"{path}: no tokens")
    return tokens


def _bearer_token(authorization: str) -> str:
    """The token of an ``authorization: Bearer <token>`` value; AccessDenied when there is none."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AccessDenied(ErrorCode.UNAUTHENTICATED, "missing 'authorization: Bearer <token>'")
    return token.strip()


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
        return cls(_read_token_file(path, tenants=True))

    @property
    def requires_token(self) -> bool:
        return bool(self.tokens)

    @property
    def tenants_isolated(self) -> bool:
        """Whether some caller is kept from other tenants' entries (a token is bound to a tenant);
        otherwise every caller may act as any tenant."""
        return any(tenant is not None for tenant in self.tokens.values())

    def tenant(self, metadata: Metadata) -> str:
        """The caller's tenant ("" for none); raises AccessDenied for a missing or wrong token."""
        return self.caller(metadata)[0]

    def caller(self, metadata: Metadata) -> tuple[str, bool]:
        """(the caller's tenant, whether its token is bound to none: a gateway, an operator); raises
        AccessDenied for a missing or wrong token. Without tokens every caller is unbound."""
        headers = {key: value for key, value in metadata or () if isinstance(value, str)}
        asked = headers.get(TENANT_HEADER, "")
        if asked and not _TENANT_NAME.fullmatch(asked):
            raise AccessDenied(ErrorCode.INVALID_ARGUMENT, f"{TENANT_HEADER} must match [A-Za-z0-9._-]{{1,64}}")
        if not self.requires_token:
            return asked, True
        fingerprint = _fingerprint(_bearer_token(headers.get(AUTHORIZATION_HEADER, "")))
        if fingerprint not in self.tokens:
            raise AccessDenied(ErrorCode.UNAUTHENTICATED, "unknown token")
        bound = self.tokens[fingerprint]
        if bound is None:
            return asked, True
        if asked and asked != bound:
            raise AccessDenied(ErrorCode.PERMISSION_DENIED, f"this token may not act as tenant {asked!r}")
        return bound, False


@dataclass(frozen=True)
class MetricsAccess:
    """Who may read the metrics port's numbers (``/metrics``, ``/api/stats``): server-wide, every tenant's.

    Open when the server has no tokens at all. Otherwise a bearer token from ``--metrics-token-file``
    (a Prometheus scraper, an operator) or an ``--auth-token-file`` token bound to no tenant (a trusted
    gateway, which may act as any tenant anyway); a token bound to a tenant sees only its own numbers,
    through ``GetStats``.
    """

    access: Access
    metrics_tokens: frozenset[bytes] = frozenset()

    @classmethod
    def build(cls, access: Access, metrics_token_file: str | Path | None) -> MetricsAccess:
        tokens = _read_token_file(metrics_token_file, tenants=False) if metrics_token_file else {}
        return cls(access, frozenset(tokens))

    @property
    def requires_token(self) -> bool:
        return self.access.requires_token or bool(self.metrics_tokens)

    @property
    def locked(self) -> bool:
        """Tokens are required but none may read the numbers (every token is bound to a tenant)."""
        return self.requires_token and not self.metrics_tokens and None not in self.access.tokens.values()

    def check(self, authorization: str) -> None:
        """Raises AccessDenied unless the ``Authorization`` header's value may read the numbers."""
        if not self.requires_token:
            return
        fingerprint = _fingerprint(_bearer_token(authorization))
        if fingerprint in self.metrics_tokens:
            return
        if fingerprint not in self.access.tokens:
            raise AccessDenied(ErrorCode.UNAUTHENTICATED, "unknown token")
        if self.access.tokens[fingerprint] is not None:
            raise AccessDenied(
                ErrorCode.PERMISSION_DENIED,
                "a token bound to a tenant cannot read server-wide numbers (GetStats has its own); "
                "use a --metrics-token-file token",
            )


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
