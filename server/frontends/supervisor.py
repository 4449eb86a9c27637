"""The engine process's side: the link server front-ends call, and the front-end processes themselves."""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import multiprocessing.process
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitcache.cache.arena import ArenaEntry
from vitcache.config import VitcacheConfig
from vitcache.engine import EmbeddingEngine
from vitcache.errors import ConfigError, ErrorCode, ImageError
from vitcache.outcomes import ImageOutcome

from ..ports import reserved_port
from .frontend import run_frontend
from .link import CALLS, HELLO_BYTES, SECRET_BYTES, ArenaRef, LinkAddress, frame, read_frame

if TYPE_CHECKING:
    from ..metrics import ServerMetrics

log = logging.getLogger(__name__)
_SPAWN = multiprocessing.get_context("spawn")  # not fork: this process runs threads (gRPC, the batcher)
#: A front-end that dies after running this long is started again after the initial backoff, not a doubled one.
HEALTHY_RUN_S = 60.0


class FrontendStartFailed(ConfigError):
    """A front-end did not come up; its own log says why (most often a setting it cannot use: the host,
    the port, a TLS file), so the operator gets this line rather than a second traceback."""


@dataclass
class _Peer:
    """One connected front-end: its calls in progress, the entries it holds and its RPCs in flight."""

    index: int
    pid: int  # tells a restarted front-end from the one it replaces, whose connection may not have closed yet
    writer: asyncio.StreamWriter
    calls: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    pins: dict[int, ArenaEntry] = field(default_factory=dict)
    in_flight: dict[str, int] = field(default_factory=dict)  # method -> RPCs started and not finished
    serving: asyncio.Event = field(default_factory=asyncio.Event)
    calls_served: int = 0

    def send(self, message: object) -> None:
        """Nothing once the connection is closing (the front-end has gone; ``_forget`` drops what it held)."""
        if not self.writer.is_closing():
            self.writer.write(frame(message))


#: The longest path a unix socket can be bound to on Linux (sun_path, less its terminating NUL).
_MAX_SOCKET_PATH_BYTES = 107
_LINK_PREFIX, _LINK_SOCKET = "vitcache-link-", "engine.sock"


def _link_directory() -> Path:
    """A new 0700 directory for the link's socket, in the temporary directory unless its path is too long for
    a unix socket (a job scheduler's $TMPDIR can be): then in /tmp."""
    parent = tempfile.gettempdir()
    socket_path = Path(parent, _LINK_PREFIX + "x" * 8, _LINK_SOCKET)  # mkdtemp adds 8 characters
    if len(os.fsencode(socket_path)) > _MAX_SOCKET_PATH_BYTES:
        parent = "/tmp"
    return Path(tempfile.mkdtemp(prefix=_LINK_PREFIX, dir=parent))


class FrontendLink:
    """The unix socket the front-ends reach the engine through, and their calls on it.

    Invariants:
    - an entry sent as an :class:`ArenaRef` is held (``_Peer.pins``) until its front-end releases it or
      disconnects, so its arena block is not reused while a reply is being built from it;
    - a front-end that disconnects has its calls cancelled, its pins dropped and its RPCs in flight
      counted as finished, so it leaves nothing behind.
    """

    def __init__(
        self,
        engine: EmbeddingEngine,
        rpc_events: Callable[[list[tuple[str, str | None, float]]], None] | None = None,
        rpc_abandoned: Callable[[str, int], None] | None = None,
    ) -> None:
        self.engine = engine
        self.arena = engine.l1.arena
        self.serving = True
        self._rpc_events = rpc_events
        self._rpc_abandoned = rpc_abandoned
        self._directory: Path | None = None
        self.address = LinkAddress("", secrets.token_bytes(SECRET_BYTES))  # the path is made by start()
        self.peers: dict[int, _Peer] = {}
        self.entries_sent_inline = 0  # entries not in the arena (too large for L1, Put entries): their bytes cross
        self._pins = itertools.count(1)
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Future[None] | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def pinned(self) -> int:
        """Entries the front-ends hold now."""
        return sum(len(peer.pins) for peer in self.peers.values())

    async def start(self) -> None:
        self._directory = _link_directory()
        self.address = replace(self.address, path=str(self._directory / _LINK_SOCKET))
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.address.path)
        os.chmod(self.address.path, 0o600)
        self._listener.listen(64)
        self._listener.setblocking(False)
        self._accepting = asyncio.ensure_future(self._accept())

    async def stop(self) -> None:
        """Closes every connection and the socket, and removes the directory; also after a failed start."""
        tasks = [*self._connections, *([self._accepting] if self._accepting is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)

    def set_serving(self, serving: bool) -> None:
        """Tells every front-end's health service whether the engine can compute."""
        self.serving = serving
        for peer in self.peers.values():
            peer.send(("health", serving))

    async def wait_serving(self, index: int, pid: int) -> None:
        """Until front-end ``index``, process ``pid``, has connected and bound the gRPC port (a connection of
        the process it replaces may still be listed under ``index``)."""
        while (peer := self.peers.get(index)) is None or peer.pid != pid:
            await asyncio.sleep(0.01)
        await peer.serving.wait()

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            conn, _ = await loop.sock_accept(self._listener)
            task = asyncio.ensure_future(self._serve(conn))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _serve(self, conn: socket.socket) -> None:
        peer = None
        try:
            reader, writer = await asyncio.open_unix_connection(sock=conn)
            said = self.address.sender_of(await asyncio.wait_for(reader.readexactly(HELLO_BYTES), 10))
            if said is None:
                raise ConnectionError("not the secret")
            peer = _Peer(*said, writer)
            old = self.peers.get(peer.index)
            self.peers[peer.index] = peer
            if old is not None:
                old.writer.close()
            welcome = frame(
                ("welcome", self.engine.served_model, self.serving, self.arena.capacity if self.arena else 0)
            )
            fds = [self.arena.read_only_fd()] if self.arena is not None else []
            try:
                await loop_send_fds(conn, welcome, fds)
            finally:
                for fd in fds:
                    os.close(fd)
            while True:
                self._handle(peer, await read_frame(reader))
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError):
            if peer is None:
                log.warning("frontend link: a connection without the secret; closed")
        finally:
            if peer is not None:
                self._forget(peer)
            conn.close()

    def _handle(self, peer: _Peer, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "call":
            _, call_id, method, args = message
            task = asyncio.ensure_future(self._call(peer, call_id, method, args))
            peer.calls[call_id] = task
            task.add_done_callback(lambda _: peer.calls.pop(call_id, None))
        elif kind == "cancel":
            task = peer.calls.get(message[1])
            if task is not None:
                task.cancel()
        elif kind == "release":
            for pin in message[1]:
                peer.pins.pop(pin, None)
        elif kind == "rpcs":
            for method, code, _ in message[1]:
                peer.in_flight[method] = peer.in_flight.get(method, 0) + (1 if code is None else -1)
            if self._rpc_events is not None:
                self._rpc_events(message[1])
        elif kind == "serving":
            peer.serving.set()

    async def _call(self, peer: _Peer, call_id: int, method: str, args: tuple[Any, ...]) -> None:
        peer.calls_served += 1
        result: object = None
        try:
            if method not in CALLS:
                raise ImageError(ErrorCode.INTERNAL, f"the engine has no call {method!r}")
            if CALLS[method]:
                async for outcome in getattr(self.engine, method)(*args):
                    peer.send(("outcome", call_id, *self._shipped(peer, outcome)))
                    await peer.writer.drain()
            elif method == "put":
                await self.engine.put(*args)
            else:
                result = self.engine.snapshot()
        except ImageError as exc:
            result = exc
        except asyncio.CancelledError:
            return  # the front-end cancelled the call: it expects no end
        except ConnectionError:
            return  # the front-end has gone while the answer was being written: nobody to tell
        except Exception as exc:  # what a local call would raise, told to the front-end rather than lost here
            log.exception("frontend link: %s failed", method)
            result = ImageError(ErrorCode.INTERNAL, f"{method} failed in the engine: {exc}")
        peer.send(("end", call_id, result))

    def _shipped(self, peer: _Peer, outcome: ImageOutcome) -> tuple[ImageOutcome, ArenaRef | None]:
        """``outcome`` to send: an arena entry as its place there (pinned), any other entry as it is."""
        entry = outcome.entry
        if not isinstance(entry, ArenaEntry):
            self.entries_sent_inline += entry is not None
            return outcome, None
        pin = next(self._pins)
        peer.pins[pin] = entry
        outputs = tuple(
            (out.dtype, out.shape, at, out.nbytes)
            for out, at in zip(entry.outputs, entry.output_offsets(), strict=True)
        )
        return replace(outcome, entry=None), ArenaRef(pin, entry.grid_thw, outputs, entry.video)

    def _forget(self, peer: _Peer) -> None:
        if self.peers.get(peer.index) is peer:
            del self.peers[peer.index]
        for task in peer.calls.values():
            task.cancel()
        peer.pins.clear()
        if self._rpc_abandoned is not None:
            for method, count in peer.in_flight.items():
                if count:
                    self._rpc_abandoned(method, count)
        peer.writer.close()


async def loop_send_fds(conn: socket.socket, data: bytes, fds: list[int]) -> None:
    """Sends ``data`` with ``fds`` attached to its first byte on the non-blocking ``conn``."""
    sent = 0
    while sent < len(data):
        try:
            sent += socket.send_fds(conn, [data[sent:]], fds if sent == 0 else [])
        except BlockingIOError:
            await asyncio.sleep(0.001)


class FrontendProcesses:
    """``--frontends`` processes serving gRPC on one port for this process's engine.

    Invariants:
    - every front-end binds the same port with SO_REUSEPORT; a port of 0 is picked here first and held
      (bound, not listening, so it takes no connections) until they have all bound it;
    - a front-end that dies is started again after ``restart_backoff_s``, doubling while it keeps dying
      early; its clients see their connections close (gRPC clients reconnect) and the others nothing.
    """

    def __init__(
        self,
        config: VitcacheConfig,
        engine: EmbeddingEngine,
        metrics: ServerMetrics,
        restart_backoff_s: float = 1.0,
        max_restart_backoff_s: float = 30.0,
        start_timeout_s: float = 120.0,
    ) -> None:
        self.config = config
        self.count = config.transport.frontends
        self.link = FrontendLink(engine, metrics.record_forwarded, metrics.forwarded_abandoned)
        self.restart_backoff_s = restart_backoff_s
        self.max_restart_backoff_s = max_restart_backoff_s
        self.start_timeout_s = start_timeout_s
        self.port = 0
        self.restarts = 0
        self.processes: list[multiprocessing.process.BaseProcess | None] = [None] * self.count
        self._exits: list[asyncio.Future[None] | None] = [None] * self.count  # each done when its process exits
        self._watchers: list[asyncio.Task[None]] = []
        self._stopping = False

    @property
    def pids(self) -> list[int | None]:
        return [process.pid if process is not None else None for process in self.processes]

    async def start(self) -> int:
        """Starts the link and every front-end; the port they serve. Fails (stopping what started) if one
        cannot bind the port or does not come up in time."""
        transport = self.config.transport
        try:
            await self.link.start()
            with reserved_port(transport.host, transport.port) as port:
                self.port = port
                await asyncio.gather(*(self._start(index) for index in range(self.count)))
        except BaseException:
            await self.stop(0)
            raise
        self._watchers = [asyncio.ensure_future(self._watch(index)) for index in range(self.count)]
        return port

    async def set_serving(self, serving: bool) -> None:
        """Every front-end's health says whether the engine can compute (the encoder pool's callback)."""
        self.link.set_serving(serving)

    async def stop(self, grace_s: float = 5.0) -> None:
        self._stopping = True
        for watcher in self._watchers:
            watcher.cancel()
        running = [process for process in self.processes if process is not None and process.is_alive()]
        for process in running:
            process.terminate()  # SIGTERM: the front-end finishes its calls within the grace period
        exits = [exited for exited in self._exits if exited is not None]
        if exits:
            await asyncio.wait(exits, timeout=grace_s + 2)
        for process in running:
            if process.is_alive():
                process.kill()
        if exits:
            await asyncio.wait(exits, timeout=5)
        await self.link.stop()

    async def _start(self, index: int) -> None:
        process = _SPAWN.Process(
            target=run_frontend,
            args=(self.config, self.link.address, index, self.port, logging.getLogger().getEffectiveLevel()),
            name=f"vitcache-frontend-{index}",
            daemon=True,
        )
        process.start()
        self.processes[index] = process
        exited = self._exits[index] = _exit_of(process)
        serving = asyncio.ensure_future(self.link.wait_serving(index, process.pid))
        try:
            done, _ = await asyncio.wait({serving, exited}, timeout=self.start_timeout_s, return_when="FIRST_COMPLETED")
        finally:
            serving.cancel()
        if serving in done and not serving.cancelled():
            return
        if process.is_alive():
            process.kill()
            raise FrontendStartFailed(f"front-end {index} did not serve within {self.start_timeout_s:.0f} s; killed it")
        raise FrontendStartFailed(
            f"front-end {index} exited with code {process.exitcode} before serving: its log above says why"
        )

    async def _watch(self, index: int) -> None:
        backoff = self.restart_backoff_s
        while not self._stopping:
            process, exited = self.processes[index], self._exits[index]
            assert process is not None and exited is not None
            started = time.monotonic()
            await asyncio.shield(exited)  # cancelling the watcher leaves the future to stop()
            if self._stopping:
                return
            if time.monotonic() - started > HEALTHY_RUN_S:  # it did not die early: no backoff left over
                backoff = self.restart_backoff_s
            log.error("front-end %d exited with code %s; starting it again in %.0f s", index, process.exitcode, backoff)
            await asyncio.sleep(backoff)
            try:
                await self._start(index)
            except FrontendStartFailed as exc:
                log.error("%s", exc)
            except Exception as exc:  # e.g. no process could be spawned (out of fds or memory): try again later
                log.error("front-end %d could not be started (%s); trying again", index, exc)
            self.restarts += 1
            backoff = min(self.max_restart_backoff_s, backoff * 2)


def _exit_of(process: multiprocessing.process.BaseProcess) -> asyncio.Future[None]:
    """A future done once ``process`` has exited and been reaped. The loop watches its sentinel: a thread
    blocked in ``join`` for each front-end's lifetime would take the default executor's few workers."""
    loop = asyncio.get_running_loop()
    exited = loop.create_future()

    def reap() -> None:
        loop.remove_reader(process.sentinel)
        process.join()
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(process.sentinel, reap)
    return exited
