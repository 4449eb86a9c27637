"""Fixtures of the tests that run in .venv-vllm (scripts/vllm_env.sh): a real vitcache server started from the
main venv (``$VITCACHE_BIN``, default ``.venv/bin/vitcache``) as a subprocess on a free port."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# vLLM's own unit-test helpers (create_ec_vllm_config) come from its sdist, extracted by scripts/vllm_env.sh.
sys.path.insert(0, str(Path(sys.prefix) / "vllm-src"))


@dataclass
class RunningServer:
    process: subprocess.Popen[str]
    target: str
    shm_socket: str | None = None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


def start_server(*extra: str) -> RunningServer:
    """``vitcache serve --port 0`` with the tiny model; returns once it prints the port it listens on."""
    binary = os.environ.get("VITCACHE_BIN", str(ROOT / ".venv" / "bin" / "vitcache"))
    command = [binary, "serve", "--port", "0", "--metrics-port", "0", *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    lines: list[str] = []
    timer = threading.Timer(180, process.kill)  # a server that never comes up ends the wait below
    timer.start()
    try:
        for line in process.stdout:
            lines.append(line)
            if line.startswith("vitcache listening on "):
                target = line.split()[-1]
                print(f"vitcache server on {target}")
                threading.Thread(target=process.stdout.read, daemon=True).start()  # keep draining its log
                return RunningServer(process, target)
    finally:
        timer.cancel()
    raise RuntimeError(f"vitcache serve exited without listening:\n{''.join(lines)}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One server for the module, with its same-host shared-memory socket too."""
    shm_socket = str(tmp_path_factory.mktemp("shm") / "vitcache.sock")
    running = start_server("--shm-socket", shm_socket)
    running.shm_socket = shm_socket
    yield running
    running.stop()
