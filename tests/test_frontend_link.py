"""The engine's side of the --frontends link, driven by hand-made front-end connections."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from vitcache.server.background import BackgroundServer
from vitcache.server.frontends import supervisor
from vitcache.server.frontends.link import LinkAddress, frame
from vitcache.server.frontends.supervisor import FrontendLink, FrontendProcesses, _Peer
from vitcache.server.metrics import ServerMetrics
from vitcache.v1 import vitcache_pb2 as pb
from vitcache.v1 import vitcache_pb2_grpc as pb_grpc

from vitcache.config import VitcacheConfig
from vitcache.errors import ConfigError
from vitcache.inputs import Scope

from .conftest import free_port, server_thread


@pytest.fixture(scope="module")
def fronted(encoder) -> Iterator[BackgroundServer]:  # type: ignore[no-untyped-def]
    server = server_thread(VitcacheConfig.of(frontends=1), encoder)
    yield server
    server.stop()


def _link(server: BackgroundServer) -> FrontendLink:
    assert server.running.frontends is not None
    return server.running.frontends.link


def _serving_peer(address: LinkAddress, index: int, pid: int) -> socket.socket:
    """A connection that says hello as front-end ``index`` of process ``pid``, then that it serves."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(address.path)
    sock.sendall(address.hello(index, pid))
    _, fds, _, _ = socket.recv_fds(sock, 1 << 16, 1)
    for fd in fds:
        os.close(fd)
    sock.sendall(frame(("serving",)))
    return sock


def test_a_restarted_frontend_is_awaited_not_the_connection_it_replaces(fronted: BackgroundServer) -> None:
    """The old process's connection may still be listed when its successor starts: waiting must not end on it."""
    link = _link(fronted)
    old = _serving_peer(link.address, 7, pid=1_000_001)
    try:
        fronted.call(asyncio.wait_for(link.wait_serving(7, 1_000_001), 10))
        with pytest.raises(asyncio.TimeoutError):
            fronted.call(asyncio.wait_for(link.wait_serving(7, 1_000_002), 0.5))
        new = _serving_peer(link.address, 7, pid=1_000_002)
        try:
            fronted.call(asyncio.wait_for(link.wait_serving(7, 1_000_002), 10))
        finally:
            new.close()
    finally:
        old.close()


def test_no_thread_is_parked_waiting_for_a_frontend_to_exit(fronted: BackgroundServer) -> None:
    """One per front-end for its lifetime would hold the default executor's workers (6 on 2 cores): with a
    few front-ends, the engine's ``to_thread`` work (digests of large requests) would never run."""
    joining = [
        thread
        for thread, top in sys._current_frames().items()
        for frame, _ in traceback.walk_stack(top)
        if frame.f_code.co_name == "join" and frame.f_code.co_filename.endswith("multiprocessing/process.py")
    ]
    assert not joining


def test_a_failed_start_leaves_no_link_behind(fronted: BackgroundServer) -> None:
    """A start that fails before any front-end runs (here: a host that does not resolve) still closes the
    link's socket and removes its directory."""
    frontends = FrontendProcesses(
        VitcacheConfig.of(frontends=1, host="nosuchhost.invalid", port=0), fronted.engine, ServerMetrics()
    )
    with pytest.raises(OSError):
        fronted.call(frontends.start())
    directory = Path(frontends.link.address.path).parent
    assert directory.name.startswith("vitcache-link-") and not directory.exists()


def test_a_frontend_gone_mid_stream_is_not_an_error(
    fronted: BackgroundServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The engine is writing a long answer when the front-end's connection closes (killed, OOM): its call
    ends quietly, with no traceback for the operator."""
    link = _link(fronted)
    peer = _serving_peer(link.address, 8, pid=1_000_003)
    digests = [i.to_bytes(16, "little") for i in range(50_000)]  # far more outcomes than the socket buffers
    peer.sendall(frame(("call", 1, "fetch", (digests, Scope()))))
    peer.recv(1)  # the answer has started
    engine_side = link.peers[8]
    with caplog.at_level(logging.WARNING):
        peer.close()
        fronted.call(_until_ended(engine_side))
    assert 8 not in link.peers and not engine_side.pins
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


async def _until_ended(peer: _Peer) -> None:
    """Until the engine has dropped ``peer``'s calls (each leaves ``calls`` when its task is done)."""
    while peer.calls or not peer.writer.is_closing():
        await asyncio.sleep(0.01)


def test_a_stopping_frontend_reports_its_last_rpcs(encoder) -> None:  # type: ignore[no-untyped-def]
    """A front-end sends its RPC counts every 0.2 s: those of its last moments are sent when it stops."""
    server = server_thread(VitcacheConfig.of(frontends=1), encoder)
    metrics = server.running.metrics  # type: ignore[union-attr]
    assert metrics is not None
    try:
        with grpc.insecure_channel(server.target) as channel:
            for _ in range(3):
                list(pb_grpc.VitCacheStub(channel).Fetch(pb.FetchRequest(digests=[bytes(16)])))
    finally:
        server.stop()
    assert metrics.registry.get_sample_value("vitcache_requests_total", {"method": "Fetch", "code": "OK"}) == 3


def test_a_frontend_that_cannot_start_is_one_line_for_the_operator(fronted: BackgroundServer) -> None:
    """The front-end's log says why it exited; the server's start fails with a ConfigError, which ``vitcache``
    prints as a line, not a second traceback."""
    config = VitcacheConfig.of(frontends=1, host="nosuchhost.invalid", port=free_port())
    frontends = FrontendProcesses(config, fronted.engine, ServerMetrics())
    with pytest.raises(ConfigError, match="front-end 0 exited with code 1 before serving"):
        fronted.call(frontends.start())
    assert not Path(frontends.link.address.path).parent.exists()


def test_a_frontend_that_cannot_even_be_spawned_is_tried_again(
    fronted: BackgroundServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spawn that fails (no fds, no memory) must not end the front-end's watch: it is tried again."""
    frontends = fronted.running.frontends  # type: ignore[union-attr]
    assert frontends is not None
    spawn, failed = supervisor._SPAWN, []

    def no_process() -> None:
        failed.append(True)
        raise OSError(24, "Too many open files")

    class FailingOnce:
        def Process(self, *args: Any, **kwargs: Any) -> Any:
            process = spawn.Process(*args, **kwargs)
            if not failed:
                process.start = no_process
            return process

    monkeypatch.setattr(supervisor, "_SPAWN", FailingOnce())
    victim, restarts = frontends.pids[0], frontends.restarts
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while not (frontends.restarts >= restarts + 2 and frontends.pids[0] not in (None, victim)):
        assert time.monotonic() < deadline, "front-end 0 was not started again after a failed spawn"
        time.sleep(0.05)
    assert failed, "the first spawn failed"
    fronted.call(asyncio.wait_for(frontends.link.wait_serving(0, frontends.pids[0]), 30))
