"""How a client reaches a server: TLS or mutual TLS, bearer token, tenant, keyed digests.

Everything here matches a server flag: ``tls_ca`` verifies the certificate of ``--tls-cert``,
``tls_cert``/``tls_key`` answer ``--tls-client-ca``, ``auth_token`` one of ``--auth-token-file``,
``digest_key`` is :func:`vitcache.digest.load_digest_key` of ``--digest-key-file``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.experimental


@dataclass(frozen=True)
class ConnectOptions:
    tls_ca: bytes | None = None  # PEM of the CA that signed the server's certificate; set: use TLS
    tls_cert: bytes | None = None  # PEM client certificate chain, for mutual TLS
    tls_key: bytes | None = None  # PEM key of tls_cert
    tls_server_name: str | None = None  # the name the server certificate must carry, when the target's differs
    auth_token: str | None = None  # sent as "authorization: Bearer <token>"
    tenant: str | None = None  # sent as "x-vitcache-tenant"; scopes every cache entry this client sees
    digest_key: bytes | None = None  # keyed digests: the server's --digest-key-file, through load_digest_key

    @classmethod
    def from_files(
        cls,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        auth_token_file: str | None = None,
        digest_key_file: str | None = None,
        **kwargs: Any,
    ) -> ConnectOptions:
        from vitcache.digest import load_digest_key

        def read(path: str | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return cls(
            tls_ca=read(tls_ca),
            tls_cert=read(tls_cert),
            tls_key=read(tls_key),
            auth_token=Path(auth_token_file).read_text().split()[0] if auth_token_file else None,
            digest_key=load_digest_key(digest_key_file) if digest_key_file else None,
            **kwargs,
        )

    @property
    def uses_tls(self) -> bool:
        return self.tls_ca is not None or self.tls_cert is not None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        pairs = []
        if self.auth_token:
            pairs.append(("authorization", f"Bearer {self.auth_token}"))
        if self.tenant:
            pairs.append(("x-vitcache-tenant", self.tenant))
        return tuple(pairs)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.tls_ca, self.tls_key, self.tls_cert)

    def channel_options(self, max_message_bytes: int) -> list[tuple[str, Any]]:
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if self.tls_server_name:
            options.append(("grpc.ssl_target_name_override", self.tls_server_name))
        return options


def _with_metadata(details: grpc.ClientCallDetails, extra: Sequence[tuple[str, str]]) -> grpc.aio.ClientCallDetails:
    return grpc.aio.ClientCallDetails(
        details.method,
        details.timeout,
        (*(details.metadata or ()), *extra),
        details.credentials,
        details.wait_for_ready,
    )


class _Metadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds the token and tenant to every call of a blocking channel."""

    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self.metadata = metadata

    def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return continuation(_with_metadata(client_call_details, self.metadata), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return continuation(_with_metadata(client_call_details, self.metadata), request)


# grpc.aio files each interceptor under one call kind only, so there is one class per kind.
class _AsyncUnaryMetadata(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds the token and tenant to every unary call of an asyncio channel."""

    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self.metadata = metadata

    async def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return await continuation(_with_metadata(client_call_details, self.metadata), request)


class _AsyncStreamMetadata(grpc.aio.UnaryStreamClientInterceptor):
    """Adds the token and tenant to every response-streaming call of an asyncio channel."""

    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self.metadata = metadata

    async def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return await continuation(_with_metadata(client_call_details, self.metadata), request)


def open_channel(target: str, options: ConnectOptions, max_message_bytes: int) -> grpc.Channel:
    # A response stream read on the calling thread, not handed over from the channel's polling thread:
    # 0.9 ms less per 1-image Fetch on 2 cores (docs/benchmarks.md); every stream here is read by its caller.
    single_threaded = (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)
    channel_options = [*options.channel_options(max_message_bytes), single_threaded]
    if options.uses_tls:
        channel = grpc.secure_channel(target, options.credentials(), channel_options)
    else:
        channel = grpc.insecure_channel(target, channel_options)
    metadata = options.metadata()
    return grpc.intercept_channel(channel, _Metadata(metadata)) if metadata else channel


def open_async_channel(target: str, options: ConnectOptions, max_message_bytes: int) -> grpc.aio.Channel:
    channel_options = options.channel_options(max_message_bytes)
    metadata = options.metadata()
    interceptors = [_AsyncUnaryMetadata(metadata), _AsyncStreamMetadata(metadata)] if metadata else None
    if options.uses_tls:
        return grpc.aio.secure_channel(target, options.credentials(), channel_options, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, channel_options, interceptors=interceptors)
