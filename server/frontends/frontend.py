"""A gRPC front-end process of ``--frontends``: the VitCache service on the engine of another process.

It runs the same servicer, interceptors, health and reflection as a server without front-ends, on a
:class:`RemoteEngine` that makes the engine's calls over the link (``server.frontends.link``; the engine's
side: ``server.frontends.supervisor``). Results in
the shared L1 arena are read from a read-only mapping of it: the reply is built straight from the
engine's copy, which the engine keeps until the reply is built.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import logging
import mmap
import os
import pickle
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

from vitcache.cache.entry import CachedEmbedding
from vitcache.config import VitcacheConfig
from vitcache.errors import ErrorCode, ImageError
from vitcache.inputs import ImageInput, Scope
from vitcache.models.served import ServedModel
from vitcache.outcomes import ImageOutcome
from vitcache.stats import EngineSnapshot

from ..grpc_server import SERVICE_NAME, grpc_server, set_health
from ..metrics import RequestMetricsInterceptor
from ..security import Access
from .link import ArenaRef, LinkAddress, frame, read_frame

log = logging.getLogger(__name__)

#: /proc/PID/comm of front-end N: PREFIX + N.
PROCESS_NAME_PREFIX = "vitcache-fe"
_PR_SET_NAME = 15
#: How often request metrics go to the engine (its /metrics counts them).
RPC_EVENTS_FLUSH_S = 0.2


class LinkLost(ImageError):
    def __init__(self) -> None:
        super().__init__(ErrorCode.UNAVAILABLE, "the server's engine process is gone; retry")


class _Call:
    """A call in progress: what the engine has sent for it, ``(kind, outcome or value, ref)``, not yet read."""

    def __init__(self, call_id: int) -> None:
        self.id = call_id
        self.messages: asyncio.Queue[tuple[str, Any, ArenaRef | None]] = asyncio.Queue()


class RemoteEngine:
    """The engine calls the servicer makes, made over the link. Outcomes come back as the engine's own
    would, with arena entries viewing this process's read-only mapping until the next outcome is asked for."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        served_model: ServedModel,
        serving: bool,
        arena: mmap.mmap | None,
    ) -> None:
        self.served_model = served_model
        self.serving = serving
        self.on_health: Callable[[bool], Awaitable[None]] | None = None
        self.lost = asyncio.Event()
        self._reader, self._writer = reader, writer
        self._arena = memoryview(arena) if arena is not None else None
        self._ids = itertools.count(1)
        self._calls: dict[int, _Call] = {}
        self._releases: list[int] = []
        self._rpc_events: list[tuple[str, str | None, float]] = []
        self._flushing = False
        self._receiving = asyncio.ensure_future(self._receive())

    @classmethod
    async def connect(cls, address: LinkAddress, index: int) -> RemoteEngine:
        """Proves the secret, takes the engine's model description, health and arena, and starts receiving."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(address.path)
        sock.sendall(address.hello(index, os.getpid()))
        data, fds, _, _ = socket.recv_fds(sock, 1 << 20, 1)
        length = int.from_bytes(data[:8], "little")
        while len(data) < 8 + length:
            more = sock.recv(8 + length - len(data))
            if not more:
                raise ConnectionError("the engine closed the link during the hello")
            data += more

        _, served_model, serving, arena_bytes = pickle.loads(data[8:])
        arena = None
        if fds:
            arena = mmap.mmap(fds[0], arena_bytes, prot=mmap.PROT_READ)
            os.close(fds[0])
        sock.setblocking(False)
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        return cls(reader, writer, served_model, serving, arena)

    def encode(self, images: Sequence[ImageInput | ImageError], scope: Scope = Scope()) -> AsyncIterator[ImageOutcome]:
        return self._stream("encode", list(images), scope)

    def fetch(self, digests: Sequence[bytes], scope: Scope = Scope()) -> AsyncIterator[ImageOutcome]:
        return self._stream("fetch", list(digests), scope)

    def fetch_keys(
        self, keys: Sequence[str], scope: Scope = Scope(), first_index: int = 0
    ) -> AsyncIterator[ImageOutcome]:
        return self._stream("fetch_keys", list(keys), scope, first_index)

    async def put(self, key: str, entry: CachedEmbedding, scope: Scope = Scope()) -> None:
        await self._result("put", key, entry, scope)

    async def snapshot_async(self) -> EngineSnapshot:
        return await self._result("snapshot")

    def rpc_event(self, method: str, code: str | None, seconds: float) -> None:
        """An RPC started (``code`` None) or finished with ``code``; sent to the engine in batches."""
        self._rpc_events.append((method, code, seconds))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_later(RPC_EVENTS_FLUSH_S, self._flush_rpc_events)

    def announce_serving(self) -> None:
        """Tells the engine this front-end has bound the gRPC port (its supervisor waits for that)."""
        self._writer.write(frame(("serving",)))

    async def close(self) -> None:
        """Sends the RPC events not sent yet (the engine's /metrics would miss the last moments'), then closes."""
        self._flush_rpc_events()
        self._receiving.cancel()
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()

    def _open(self, method: str, args: tuple[Any, ...]) -> _Call:
        if self.lost.is_set():
            raise LinkLost()
        call = _Call(next(self._ids))
        self._calls[call.id] = call
        self._writer.write(frame(("call", call.id, method, args)))
        return call

    def _close(self, call: _Call) -> None:
        """Ends a call; one the engine has not ended yet (still listed) is cancelled there."""
        if self._calls.pop(call.id, None) is not None and not self.lost.is_set():
            self._writer.write(frame(("cancel", call.id)))
        while not call.messages.empty():  # outcomes received and never asked for: their entries go back
            _, _, ref = call.messages.get_nowait()
            if ref is not None:
                self._release(ref.pin)

    async def _result(self, method: str, *args: Any) -> Any:
        """The value a call ends with."""
        call = self._open(method, args)
        try:
            _, value, _ = await call.messages.get()
        finally:
            self._close(call)
        if isinstance(value, BaseException):
            raise value
        return value

    async def _stream(self, method: str, *args: Any) -> AsyncIterator[ImageOutcome]:
        """The outcomes a call sends, then the end of the call (raising the error it ends with)."""
        call = self._open(method, args)
        try:
            while True:
                kind, value, ref = await call.messages.get()
                if kind == "end":
                    if isinstance(value, BaseException):
                        raise value
                    return
                if ref is None:
                    yield value
                    continue
                assert self._arena is not None
                try:
                    yield replace(value, entry=ref.entry(self._arena))
                finally:
                    self._release(ref.pin)
        finally:
            self._close(call)

    def _release(self, pin: int) -> None:
        if not self._releases:
            asyncio.get_running_loop().call_soon(self._flush_releases)
        self._releases.append(pin)

    def _flush_releases(self) -> None:
        pins, self._releases = self._releases, []
        if pins and not self.lost.is_set():
            self._writer.write(frame(("release", pins)))

    def _flush_rpc_events(self) -> None:
        self._flushing = False
        events, self._rpc_events = self._rpc_events, []
        if events and not self.lost.is_set():
            self._writer.write(frame(("rpcs", events)))

    async def _receive(self) -> None:
        try:
            while True:
                message = await read_frame(self._reader)
                kind = message[0]
                if kind == "health":
                    self.serving = message[1]
                    if self.on_health is not None:
                        await self.on_health(self.serving)
                    continue
                call = self._calls.pop(message[1], None) if kind == "end" else self._calls.get(message[1])
                if call is not None:
                    call.messages.put_nowait((kind, message[2], message[3] if kind == "outcome" else None))
                elif kind == "outcome" and message[3] is not None:  # of a call this side cancelled
                    self._release(message[3].pin)
        except (asyncio.IncompleteReadError, ConnectionError):
            log.error("the engine process closed the link")
        finally:
            self.lost.set()
            for call in self._calls.values():
                call.messages.put_nowait(("end", LinkLost(), None))


def _name_process(name: str) -> None:
    """``name`` in ``top``, ``ps -L`` and /proc/PID/comm (Linux; elsewhere nothing changes)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


class _ForwardedMethod:
    """A method's RPCs, counted in the engine process's /metrics."""

    def __init__(self, engine: RemoteEngine, method: str) -> None:
        self._engine, self._method = engine, method

    def started(self) -> None:
        self._engine.rpc_event(self._method, None, 0.0)

    def finished(self, code: str, seconds: float) -> None:
        self._engine.rpc_event(self._method, code, seconds)


def run_frontend(config: VitcacheConfig, address: LinkAddress, index: int, port: int, log_level: int) -> None:
    """A front-end process's main: serves gRPC on ``port`` until SIGTERM or until the engine is gone."""
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s frontend {index} %(name)s: %(message)s")
    _name_process(f"{PROCESS_NAME_PREFIX}{index}")
    asyncio.run(_serve(config, address, index, port))


async def _serve(config: VitcacheConfig, address: LinkAddress, index: int, port: int) -> None:
    engine = await RemoteEngine.connect(address, index)
    security = config.security
    access = Access.from_token_file(security.auth_token_file) if security.auth_token_file else Access.open()
    interceptor = RequestMetricsInterceptor(lambda method: _ForwardedMethod(engine, method), SERVICE_NAME)
    server, health_servicer, _ = await grpc_server(config, engine, access, interceptor, port, reuse_port=True)
    engine.on_health = lambda serving: set_health(health_servicer, serving)
    await set_health(health_servicer, engine.serving)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    engine.announce_serving()
    lost = asyncio.ensure_future(engine.lost.wait())
    await asyncio.wait([asyncio.ensure_future(stop.wait()), lost], return_when=asyncio.FIRST_COMPLETED)
    await set_health(health_servicer, False)
    await server.stop(5.0 if not engine.lost.is_set() else 0)
    await engine.close()
