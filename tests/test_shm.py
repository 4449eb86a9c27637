"""The same-host shared-memory path: real server, real Unix socket, real memfds, real client processes."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import gc
import mmap
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from vitcache.client import ConnectOptions, VitCacheClient
from vitcache.client.shm import ShmChannel, ShmRequestFailed
from vitcache.server.shm import ShmServer

from vitcache.config import VitcacheConfig
from vitcache.wire.shm_protocol import LENGTH, MEMFD_NAME, REQUEST, aligned, json_frame, request_frame

from .conftest import ServeProcess, png_bytes

REPO = Path(__file__).resolve().parent.parent
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED.value[0]


def shm_server(start_server_thread, encoder, path: Path, **config):  # type: ignore[no-untyped-def]
    return start_server_thread(VitcacheConfig.of(shm_socket=str(path), **config), encoder)


def arena_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of vitcache arenas."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if f"memfd:{MEMFD_NAME}" in line:
            start, end = line.split()[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


def wait_until(condition, timeout_s: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def raw_connection(path: Path) -> tuple[socket.socket, dict, list[int]]:
    """A hand-made connection: hello sent, welcome and its fds received."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(path))
    sock.sendall(json_frame({"metadata": []}))
    data, fds, _, _ = socket.recv_fds(sock, 4096, 1)
    return sock, read_reply(sock, data), fds


def read_reply(sock: socket.socket, data: bytes = b"") -> dict:
    import json

    while len(data) < LENGTH.size or len(data) < LENGTH.size + LENGTH.unpack_from(data)[0]:
        chunk = sock.recv(65536)
        assert chunk, "connection closed"
        data += chunk
    return json.loads(data[LENGTH.size :])


def refusals(attempts: dict[str, Callable[[], object]]) -> dict[str, int | None]:
    """The errno each attempt failed with; None for one that succeeded."""
    refused: dict[str, int | None] = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            refused[name] = None
        except OSError as exc:
            refused[name] = exc.errno
    return refused


def test_shm_results_equal_grpc_and_view_shared_memory(start_server_thread, encoder, socket_path) -> None:  # type: ignore[no-untyped-def]
    server = shm_server(start_server_thread, encoder, socket_path)
    images = [png_bytes(64, 48, 1), png_bytes(100, 30, 2), png_bytes(30, 100, 3)]
    with VitCacheClient(server.target) as plain:
        reference = [r.raise_for_error() for r in plain.encode(images)]
    with VitCacheClient(server.target, shm_socket=socket_path, shm_shared_l1=False) as client:
        results = [r.raise_for_error() for r in client.encode(images)]
        assert [r.source for r in results] == ["L1"] * 3
        mappings = arena_mappings()
        for got, want in zip(results, reference, strict=True):
            assert (got.digest, got.grid_thw) == (want.digest, want.grid_thw)
            (tensor,) = got.embeddings
            assert tensor.dtype == torch.float32 and tensor.shape == want.embeddings[0].shape
            assert tensor.numpy().tobytes() == want.embeddings[0].numpy().tobytes()
            assert any(start <= tensor.data_ptr() < end for start, end in mappings), "not a view of an arena"
        assert server.running.shm.connections == 1
        assert server.running.shm.leased_bytes >= sum(aligned(r.embeddings[0].nbytes) for r in results)
        tensor = results[0].embeddings[0]
        del results, got
        gc.collect()
        client.fetch([reference[0].digest])  # carries the releases of the dropped results
        # Two leases: the new result and the one `tensor` still views (a view keeps its lease).
        assert server.running.shm.leased_bytes == 2 * aligned(tensor.nbytes)
        assert tensor.numpy().tobytes() == reference[0].embeddings[0].numpy().tobytes()
    assert wait_until(lambda: server.running.shm.connections == 0)


def test_misses_and_a_full_arena_fail_per_image_and_leases_come_back(start_server_thread, encoder, socket_path) -> None:  # type: ignore[no-untyped-def]
    images = [png_bytes(64, 64, seed) for seed in (4, 5, 6)]
    probe = start_server_thread(VitcacheConfig.of(), encoder)
    with VitCacheClient(probe.target) as client:
        size = aligned(client.encode(images[:1])[0].raise_for_error().embeddings[0].nbytes)
    server = shm_server(start_server_thread, encoder, socket_path, shm_arena_bytes=2 * size)
    with VitCacheClient(server.target) as plain:
        digests = [r.raise_for_error().digest for r in plain.encode(images)]
    channel = ShmChannel(socket_path, shared_l1=False)
    try:
        results = channel.fetch([*digests, b"\x00" * 16])
        assert [r.error is None for r in results] == [True, True, False, False]
        assert results[2].error[0] == RESOURCE_EXHAUSTED and "arena full" in results[2].error[1]
        assert results[3].error[0] == NOT_FOUND
        del results
        gc.collect()
        (third,) = channel.fetch(digests[2:])  # fits once the dropped results' leases are released
        assert third.error is None and server.running.shm.leased_bytes == size
    finally:
        channel.close()
    with VitCacheClient(server.target, shm_socket=socket_path, shm_shared_l1=False) as client:
        # An image the arena has no room for comes over gRPC instead.
        held = client.fetch(digests)
        assert [r.raise_for_error().source for r in held] == ["L1"] * 3


def test_socket_directory_socket_and_segments_are_private(start_server_thread, encoder, socket_path) -> None:  # type: ignore[no-untyped-def]
    server = shm_server(start_server_thread, encoder, socket_path)
    assert stat.S_IMODE(socket_path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
    sock, welcome, fds = raw_connection(socket_path)
    try:
        assert len(fds) == 1 and welcome["arena_bytes"] == server.running.shm.arena_bytes
        info = os.fstat(fds[0])
        assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.getuid()
        assert os.readlink(f"/proc/self/fd/{fds[0]}").startswith(f"/memfd:{MEMFD_NAME}")  # no file system name
    finally:
        for fd in fds:
            os.close(fd)
        sock.close()
    open_dir = socket_path.parent.parent / "open"
    open_dir.mkdir(mode=0o755)
    open_dir.chmod(0o755)
    shm = ShmServer(server.engine, open_dir / "vitcache.sock", 1 << 20, 16)
    with pytest.raises(PermissionError, match="chmod 700"):
        asyncio.run(shm.start())
    with pytest.raises(FileExistsError, match="another server"):
        asyncio.run(ShmServer(server.engine, socket_path, 1 << 20, 16).start())


def test_killed_clients_leave_no_segments_behind(start_server_thread, encoder, socket_path) -> None:  # type: ignore[no-untyped-def]
    """10,000 requests from clients killed mid-stream, four at a time, each holding leases."""
    server = shm_server(start_server_thread, encoder, socket_path)
    with VitCacheClient(server.target) as plain:
        digests = [r.raise_for_error().digest for r in plain.encode([png_bytes(64, 48, s) for s in (7, 8)])]
    shm = server.running.shm
    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    fds_before = len(os.listdir("/proc/self/fd"))
    command = [sys.executable, "-m", "tests.shm_client_process", str(socket_path), *(d.hex() for d in digests)]
    requests_done = 0
    while requests_done < 10_000:
        clients = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True) for _ in range(4)]
        try:
            for client in clients:
                assert client.stdout is not None
                done = 0
                while done < 625:  # each client is mid-stream, holding leases, when it is killed
                    line = client.stdout.readline()
                    assert line, f"client exited early with {client.wait(timeout=10)}"
                    done = int(line)
                requests_done += done
            assert shm.connections == 4 and shm.leased_bytes > 0
        finally:
            for client in clients:
                client.send_signal(signal.SIGKILL)
                client.wait(timeout=10)
                assert client.stdout is not None
                client.stdout.close()
        assert wait_until(lambda: shm.connections == 0), "the server kept a dead client's arena"
        assert shm.leased_bytes == 0
        assert arena_mappings() == []  # the server unmapped every arena (the clients were other processes)
    assert requests_done >= 10_000
    assert wait_until(lambda: len(os.listdir("/proc/self/fd")) <= fds_before), "the server leaked descriptors"
    after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    assert not [name for name in after - before if "vitcache" in name]
    with VitCacheClient(server.target, shm_socket=socket_path) as client:
        assert [r.raise_for_error().source for r in client.fetch(digests)] == ["L1", "L1"]


def test_a_client_cannot_resize_its_arena_so_the_server_lives_on(tiny_checkpoint, socket_path, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A client that shrank its arena and then asked for a cached digest made the server write past the
    end of the file: SIGBUS, and every tenant lost the server. The server runs in its own process here."""
    arena_bytes = 1 << 20
    flags = ["--model", str(tiny_checkpoint), "--shm-socket", str(socket_path), f"--shm-arena-bytes={arena_bytes}"]
    server = ServeProcess(flags, tmp_path / "server.log")
    try:
        server.wait_listening()
        with VitCacheClient(server.target) as plain:
            (cached,) = plain.encode([png_bytes(56, 56, 30)])
        sock, welcome, (fd,) = raw_connection(socket_path)
        with sock:
            assert welcome["arena_bytes"] == arena_bytes
            # Scribbling on the memory through its own mapping spoils only what this client reads.
            view = mmap.mmap(fd, arena_bytes)
            view[:] = b"\xff" * arena_bytes
            attempts = {
                "grow": lambda: os.ftruncate(fd, 2 * arena_bytes),
                "seal writes": lambda: fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE),
                "shrink": lambda: os.ftruncate(fd, 0),
            }
            refused = refusals(attempts)
            os.close(fd)
            sock.sendall(request_frame([cached.digest], []))
            (result,) = read_reply(sock)["results"]  # where the server died of SIGBUS
            assert refused == dict.fromkeys(attempts, errno.EPERM)
            (_, _, offset, nbytes) = result["outputs"][0]
            assert view[offset : offset + nbytes] == cached.embeddings[0].numpy().tobytes()
            view.close()
        assert server.proc.poll() is None
        with VitCacheClient(server.target, shm_socket=socket_path) as client:
            assert client.fetch([cached.digest])[0].raise_for_error().source == "L1"  # shared memory
            assert client.stats().images_computed == 1  # and gRPC
    finally:
        server.stop()


def test_malformed_requests_end_only_their_own_connection(start_server_thread, encoder, socket_path) -> None:  # type: ignore[no-untyped-def]
    server = shm_server(start_server_thread, encoder, socket_path, max_images_per_request=4)
    with VitCacheClient(server.target) as plain:
        (digest,) = [r.raise_for_error().digest for r in plain.encode([png_bytes(40, 40, 9)])]
    good = ShmChannel(socket_path)
    try:
        # Not a hello: the connection is closed, nothing else happens.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(socket_path))
            sock.sendall(LENGTH.pack(5) + b"{oops")
            assert sock.recv(100) == b""
        # Releasing a lease it does not hold: INVALID_ARGUMENT, and the connection goes on.
        sock, _, fds = raw_connection(socket_path)
        for fd in fds:
            os.close(fd)
        with sock:
            sock.sendall(REQUEST.pack(1, 0) + digest)
            lease = read_reply(sock)["results"][0]["lease"]
            sock.sendall(request_frame([digest], [lease + 64]))
            assert read_reply(sock)["error"][0] == INVALID_ARGUMENT
            sock.sendall(request_frame([digest], [lease]))
            assert read_reply(sock)["results"][0]["lease"] == lease  # released, then leased again
            # More digests than --max-images-per-request: an error, then the server hangs up.
            sock.sendall(REQUEST.pack(1_000_000, 0))
            reply = read_reply(sock)
            assert reply["error"][0] == INVALID_ARGUMENT and "max-images-per-request" in reply["error"][1]
            assert sock.recv(100) == b""
        assert good.fetch([digest])[0].error is None
        # A client asking for more than one request holds: split by the server's limit, in order.
        results = good.fetch([digest, b"\x00" * 16] * 5)
        assert [r.index for r in results] == list(range(10))
        assert [r.error is None for r in results] == [True, False] * 5
    finally:
        good.close()


def test_shm_hello_checks_token_and_keeps_tenants_apart(start_server_thread, encoder, socket_path, tmp_path) -> None:  # type: ignore[no-untyped-def]
    tokens = tmp_path / "tokens"
    tokens.write_text("token-a tenant-a\ntoken-b tenant-b\n")
    server = shm_server(start_server_thread, encoder, socket_path, auth_token_file=str(tokens))
    image = png_bytes(48, 48, 10)
    as_a, as_b = ConnectOptions(auth_token="token-a"), ConnectOptions(auth_token="token-b")
    with VitCacheClient(server.target, options=as_a, shm_socket=socket_path) as client:
        (computed,) = client.encode([image])
        assert computed.raise_for_error().source == "COMPUTED"
        assert client.fetch([computed.digest])[0].raise_for_error().source == "L1"
    with VitCacheClient(server.target, options=as_b, shm_socket=socket_path) as client:
        (other,) = client.fetch([computed.digest])
        assert other.error is not None and other.error.code is grpc.StatusCode.NOT_FOUND
    with pytest.raises(ShmRequestFailed) as refused:
        ShmChannel(socket_path)
    assert refused.value.code == UNAUTHENTICATED


def test_threads_sharing_one_client_get_their_own_answers(start_server_thread, encoder, socket_path) -> None:  # type: ignore[no-untyped-def]
    server = shm_server(start_server_thread, encoder, socket_path)
    images = [png_bytes(64, 48, seed) for seed in (20, 21, 22, 23)]
    with VitCacheClient(server.target) as plain:
        reference = {r.digest: r.embeddings[0].numpy().tobytes() for r in plain.encode(images)}
    digests = list(reference)
    with VitCacheClient(server.target, shm_socket=socket_path) as client:

        def lookups(offset: int) -> list[bool]:
            order = digests[offset:] + digests[:offset]
            return [
                [r.raise_for_error().embeddings[0].numpy().tobytes() for r in client.fetch(order)]
                == [reference[d] for d in order]
                for _ in range(20)
            ]

        with ThreadPoolExecutor(4) as pool:
            outcomes = [ok for batch in pool.map(lookups, range(4)) for ok in batch]
    assert outcomes == [True] * 80
