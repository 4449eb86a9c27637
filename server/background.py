"""A server for programs that are not asyncio: its own event loop in a daemon thread."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from .app import RunningServer, ServerConfig, start_server


class BackgroundServer:
    """Starts ``start_server(config, encoder)`` on a loop of its own; ``target`` is its gRPC address."""

    def __init__(self, config: ServerConfig, encoder: Any = None, timeout_s: float = 120.0) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="vitcache-server", daemon=True)
        self._thread.start()
        self.running: RunningServer = asyncio.run_coroutine_threadsafe(start_server(config, encoder), self.loop).result(
            timeout_s
        )
        self.target = f"{config.host}:{self.running.port}"

    def stop(self, timeout_s: float = 30.0) -> None:
        asyncio.run_coroutine_threadsafe(self.running.stop(grace_s=1), self.loop).result(timeout_s)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout_s)
