"""A vitcache server in a process of its own; standard library only, so any test environment can import it."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path


class ServeProcess:
    """``python -m vitcache.server.cli serve FLAGS`` in its own process, on free loopback ports by default.

    ``command`` starts the CLI some other way (the SGLang tests use the main venv's ``vitcache``).
    """

    def __init__(
        self, flags: Sequence[str], log: Path, command: Sequence[str] = (sys.executable, "-m", "vitcache.server.cli")
    ) -> None:
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            [
                *command,
                *("--log-level", "WARNING", "serve"),
                *("--port", "0", "--metrics-port", "0", "--preprocess-workers", "1", *flags),
            ],
            stdout=subprocess.PIPE,
            stderr=self._log,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        self.target = ""

    def wait_listening(self, timeout_s: float = 120) -> None:
        assert self.proc.stdout is not None
        deadline, line = time.monotonic() + timeout_s, b""
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            assert remaining > 0 and self.proc.poll() is None, "server did not start"
            if select.select([self.proc.stdout], [], [], remaining)[0]:
                line += os.read(self.proc.stdout.fileno(), 1)
        self.target = line.decode().split()[-1]  # "vitcache listening on 127.0.0.1:PORT"

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(timeout=30)
        self._log.close()
