"""Listening ports: a port that is already served is an operator's mistake, told in one line.

gRPC sets SO_REUSEPORT by default, so a second server on a served port would bind it too and
the kernel would split new connections between the two (possibly serving different models);
vitcache turns that off (``GRPC_OPTIONS``). The ports are also probed before the model loads,
so that a busy port fails in a second rather than after a long load, and without the C-core's
own log line.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterator

import grpc

from vitcache.errors import ConfigError

#: Options of every gRPC server: exclusive ports.
GRPC_OPTIONS = [("grpc.so_reuseport", 0)]


class PortInUse(ConfigError):
    """Another process listens on the port; ``flag`` is the option that picks another."""

    def __init__(self, host: str, port: int, flag: str) -> None:
        super().__init__(f"port {port} on {host} is in use: stop the other server or pick {flag}")


class HostNotLocal(ConfigError):
    """The host to serve on is no address of this machine; ``flag`` is the option that picks another."""

    def __init__(self, host: str, flag: str) -> None:
        super().__init__(f"{host} is no address of this machine: pick another {flag} (0.0.0.0: all of them)")


def bind_errno(host: str, port: int) -> int | None:
    """The errno binding ``host:port`` fails with, bound as servers bind (SO_REUSEADDR only); None if it binds.
    Port 0 binds any free port: only the host is checked then."""
    try:
        addresses = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return None  # the server's own bind says what is wrong with the host
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                    return exc.errno
    return None


def check_port_free(host: str, port: int, flag: str) -> None:
    """Raises what an operator can fix (one line) if ``host:port`` cannot be served: the port is in use
    (``flag`` picks another), or the host is no address here (the host flag that goes with ``flag``)."""
    error = bind_errno(host, port)
    if error == errno.EADDRINUSE:
        raise PortInUse(host, port, flag)
    if error == errno.EADDRNOTAVAIL:
        raise HostNotLocal(host, flag.removesuffix("port") + "host")


def add_grpc_port(
    server: grpc.aio.Server, host: str, port: int, credentials: grpc.ServerCredentials | None = None
) -> int:
    """Binds ``server`` to ``host:port``; the bound port. A busy port raises :class:`PortInUse`.

    gRPC Python says only "Failed to bind" (a RuntimeError, or 0 from older versions) whatever the cause:
    a probe tells a busy port from other faults, which keep gRPC's error.
    """
    address = f"{host}:{port}"
    try:
        bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
        if bound == 0:
            raise RuntimeError(f"failed to bind to {address}")
    except RuntimeError:
        check_port_free(host, port, "--port")
        raise
    return bound


@contextlib.contextmanager
def reserved_port(host: str, port: int) -> Iterator[int]:
    """``port``, or a free one for 0, held (bound with SO_REUSEPORT, not listening: it takes no
    connections) while front-end processes bind it with SO_REUSEPORT too."""
    if port != 0:
        yield port
        return
    family, kind, proto, _, address = socket.getaddrinfo(
        host.strip("[]"), 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    with socket.socket(family, kind, proto) as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(address)
        yield holder.getsockname()[1]
