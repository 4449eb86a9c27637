"""Client side of the same-host shared-memory path (frames: ``vitcache.wire.shm_protocol``).

Results arrive as CPU tensors viewing this connection's arena: no tensor byte is copied on
this side, and nothing here touches CUDA.
"""

from __future__ import annotations

import collections
import json
import math
import mmap
import os
import socket
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vitcache.cache.entry import VideoTiming
from vitcache.wire.shm_protocol import LENGTH, json_frame, request_frame
from vitcache.wire.tensor_codec import dtype_from_name


class ShmRequestFailed(RuntimeError):
    """The server refused the connection or a whole request (``code`` is a grpc.StatusCode number)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"shared memory request failed ({code}): {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ShmResult:
    index: int
    embeddings: list[torch.Tensor]
    grid_thw: tuple[int, ...]
    source: int  # the wire enum's value; 0 on error
    error: tuple[int, str] | None  # (grpc.StatusCode number, message)
    video: VideoTiming | None = None


def _tensor_at(region: memoryview, start: int, dtype: str, shape: Sequence[int], nbytes: int) -> torch.Tensor:
    """A tensor viewing ``region[start:start + nbytes]``; its storage holds ``region`` itself."""
    torch_dtype = dtype_from_name(dtype)
    count = math.prod(shape)
    if nbytes != count * torch_dtype.itemsize:
        raise ValueError(f"server sent an output of {nbytes} bytes that is no {dtype} {list(shape)}")
    if count == 0:
        return torch.empty(tuple(shape), dtype=torch_dtype)
    return torch.frombuffer(region, dtype=torch_dtype, count=count, offset=start).view(tuple(shape))


class ShmChannel:
    """One connection to a server's ``--shm-socket``; blocking. Thread-safe: requests take turns.

    Invariant: an image's lease is released (with the next request) only once every tensor
    viewing it is gone: their storages all hold the one memoryview of the lease that
    carries its finalizer.
    """

    def __init__(self, path: str | os.PathLike, metadata: Sequence[tuple[str, str]] = (), timeout_s: float = 30.0):
        self.timeout_s = timeout_s
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout_s)
            self._sock.connect(os.fspath(path))
            self._sock.sendall(json_frame({"metadata": [list(pair) for pair in metadata]}))
            welcome, fds, _, _ = socket.recv_fds(self._sock, 4096, 1)
            try:
                reply = self._read_json(welcome)
                if "error" in reply:
                    raise ShmRequestFailed(*reply["error"])
                if len(fds) != 1:
                    raise ConnectionError("the server sent no shared memory")
                self.arena_bytes = int(reply["arena_bytes"])
                self.max_images = int(reply["max_images"])
                arena = mmap.mmap(fds[0], self.arena_bytes)
            finally:
                for fd in fds:
                    os.close(fd)
        except BaseException:
            self._sock.close()
            raise
        # Not closed explicitly: tensors may outlive the channel; the mapping goes with the last view.
        self._arena = memoryview(arena)
        self._released: collections.deque[int] = collections.deque()
        self._turn = threading.Lock()

    def close(self) -> None:
        """Ends the connection; tensors already received stay valid."""
        self._sock.close()

    def fetch(self, digests: Sequence[bytes], timeout: float | None = None) -> list[ShmResult]:
        """Cached embeddings by digest, in input order; misses carry NOT_FOUND."""
        timeout_s = timeout if timeout is not None else self.timeout_s
        results: list[ShmResult] = []
        with self._turn:
            if self._sock.gettimeout() != timeout_s:  # a system call otherwise spent on every lookup
                self._sock.settimeout(timeout_s)
            for start in range(0, len(digests), self.max_images):
                results += self._fetch_chunk(digests[start : start + self.max_images], start)
        return results

    def _fetch_chunk(self, digests: Sequence[bytes], first_index: int) -> list[ShmResult]:
        releases = [self._released.popleft() for _ in range(len(self._released))]
        try:
            self._sock.sendall(request_frame(digests, releases))
            reply = self._read_json(b"")
        except BaseException:
            self.close()  # the server frees this connection's leases, the unsent releases among them
            raise
        if "error" in reply:
            raise ShmRequestFailed(*reply["error"])
        results = [self._result(r, first_index) for r in reply["results"]]
        return sorted(results, key=lambda r: r.index)

    def _result(self, result: dict[str, Any], first_index: int) -> ShmResult:
        index = first_index + int(result["index"])
        if "error" in result:
            code, message = result["error"]
            return ShmResult(index, [], (), 0, (int(code), str(message)))
        lease = int(result["lease"])
        outputs = result["outputs"]
        end = max((start + nbytes for _, _, start, nbytes in outputs), default=lease)
        if not 0 <= lease <= end <= self.arena_bytes:
            raise ValueError(f"server sent a lease [{lease}, {end}) outside the arena")
        region = self._arena[lease:end]
        weakref.finalize(region, self._released.append, lease).atexit = False
        tensors = [_tensor_at(region, start - lease, dtype, shape, nbytes) for dtype, shape, start, nbytes in outputs]
        video = VideoTiming.from_json(result["video"]) if "video" in result else None
        return ShmResult(index, tensors, tuple(result["grid_thw"]), int(result["source"]), None, video)

    def _read_json(self, received: bytes) -> dict[str, Any]:
        """One ``u32 length + JSON`` frame, of which ``received`` already arrived."""
        buffer = bytearray(received)
        while len(buffer) < LENGTH.size:
            buffer += self._recv()
        (size,) = LENGTH.unpack_from(buffer)
        while len(buffer) < LENGTH.size + size:
            buffer += self._recv()
        return json.loads(buffer[LENGTH.size : LENGTH.size + size])

    def _recv(self) -> bytes:
        chunk = self._sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("the vitcache server closed the shared memory connection")
        return chunk
