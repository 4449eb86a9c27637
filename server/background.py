"""A server for programs that are not asyncio: its own event loop in a daemon thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from vitcache.config import VitcacheConfig
from vitcache.engine import EmbeddingEngine

from .app import RunningServer, start_server

T = TypeVar("T")


class BackgroundServer:
    """Starts ``start_server(config, encoder)`` on a loop of its own; ``target`` is its gRPC address."""

    def __init__(self, config: VitcacheConfig, encoder: Any = None, timeout_s: float = 120.0) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="vitcache-server", daemon=True)
        self._thread.start()
        self.running: RunningServer | None = self.call(start_server(config, encoder), timeout_s)
        self.target = f"{config.transport.host}:{self.running.port}"

    @property
    def engine(self) -> EmbeddingEngine:
        assert self.running is not None, "server stopped"
        return self.running.engine

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float = 60.0) -> T:
        """Runs ``coro`` on the server's loop (e.g. ``engine.drain()``) and returns its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stops the server and its loop; a second call does nothing."""
        if self.running is None:
            return
        self.call(self.running.stop(grace_s=1), timeout_s)
        self.running = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout_s)
