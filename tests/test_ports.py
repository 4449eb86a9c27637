"""A port that is already served: a second ``vitcache serve`` says so in one line and exits non-zero,
and the first keeps every connection (gRPC's default SO_REUSEPORT would have split them)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import grpc
import pytest
from vitcache.client import VitCacheClient
from vitcache.server.app import start_server
from vitcache.server.metrics import ServerMetrics
from vitcache.server.ports import GRPC_OPTIONS, PortInUse, add_grpc_port
from vitcache.server.security import Access, MetricsAccess
from vitcache.server.web import MetricsHttpServer

from vitcache.config import VitcacheConfig


def serve(*flags: str) -> subprocess.CompletedProcess[str]:
    """``vitcache serve`` (the built-in tiny model) in its own process, until it exits."""
    command = [sys.executable, "-m", "vitcache.server.cli", "--log-level", "WARNING", "serve", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


def test_a_second_server_on_a_served_port_exits_with_one_line(start_server_thread, encoder) -> None:  # type: ignore[no-untyped-def]
    first = start_server_thread(VitcacheConfig.of(metrics_port=0), encoder)
    port, metrics_port = first.running.port, first.running.metrics_port
    second = serve("--port", str(port), "--metrics-port", "0")
    assert second.returncode == 2
    assert second.stderr.splitlines() == [
        f"vitcache serve: port {port} on 127.0.0.1 is in use: stop the other server or pick --port"
    ]
    # The metrics port likewise, told before the model loads (the CLI prints what start_server raises).
    with pytest.raises(PortInUse, match=f"^port {metrics_port} on 127.0.0.1 is in use: .* pick --metrics-port$"):
        asyncio.run(start_server(VitcacheConfig.of(port=0, metrics_port=metrics_port)))
    for _ in range(16):  # new connections, each of them to the first server
        with VitCacheClient(first.target) as client:
            assert client.model_info().namespace == first.engine.spec.namespace


def test_binding_a_port_taken_after_the_probe_is_told_the_same_way(start_server_thread, encoder) -> None:  # type: ignore[no-untyped-def]
    """Two servers started at once both pass the early probe; the later bind says what the probe would have."""
    first = start_server_thread(VitcacheConfig.of(metrics_port=0), encoder)

    async def bind_grpc() -> None:
        add_grpc_port(grpc.aio.server(options=GRPC_OPTIONS), "127.0.0.1", first.running.port)

    with pytest.raises(PortInUse, match=f"^port {first.running.port} on 127.0.0.1 is in use: .* pick --port$"):
        asyncio.run(bind_grpc())
    with pytest.raises(PortInUse, match=f"^port {first.running.metrics_port} on 127.0.0.1 .* pick --metrics-port$"):
        MetricsHttpServer(
            ServerMetrics(), "127.0.0.1", first.running.metrics_port, MetricsAccess.build(Access.open(), None)
        )


@pytest.mark.parametrize("frontends", ["0", "1"])
def test_a_host_that_is_no_address_of_this_machine_exits_with_one_line(frontends: str) -> None:
    """Told before the model loads, with or without front-ends (192.0.2.1 is TEST-NET-1: nobody's address)."""
    served = serve("--host", "192.0.2.1", "--port", "0", "--metrics-port", "0", "--frontends", frontends)
    assert served.returncode == 2
    assert served.stderr.splitlines() == [
        "vitcache serve: 192.0.2.1 is no address of this machine: pick another --host (0.0.0.0: all of them)"
    ]
