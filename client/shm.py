"""Client side of the same-host shared-memory path (frames: ``vitcache.wire.shm_protocol``).

Where the server shares its L1 (``shared_l1``), results are copied out of a read-only mapping of it
(the one copy a hit costs) and checked against their generation afterwards; otherwise they arrive as
CPU tensors viewing this connection's own arena, copied there by the server. Nothing here touches CUDA.
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

from vitcache.wire.shm_protocol import GENERATION, LENGTH, json_frame, request_frame
from vitcache.wire.tensor_codec import dtype_from_name
from vitcache.wire.timing import VideoTiming

#: Lookups of an entry that was replaced while it was being copied, before its image fails with ABORTED.
MAX_READS = 3
_ABORTED = 10  # grpc.StatusCode.ABORTED


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


def copied_out(mapping: memoryview, result: dict[str, Any]) -> list[torch.Tensor] | None:
    """The tensors of a shared-L1 ``result``, copied out of ``mapping``; None if the entry was dropped or
    replaced (its generation changed) before the copy ended, so the copy may be torn."""
    generation, at = int(result["generation"]), int(result["at"])
    spans = [(at, at + GENERATION.size)] + [(start, start + nbytes) for _, _, start, nbytes in result["outputs"]]
    if not all(0 <= start <= end <= len(mapping) for start, end in spans):
        raise ValueError(f"server sent an entry at {at} outside the shared L1")
    tensors = [
        _tensor_at(memoryview(bytearray(mapping[start : start + nbytes])), 0, dtype, shape, nbytes)
        for dtype, shape, start, nbytes in result["outputs"]
    ]
    return tensors if GENERATION.unpack_from(mapping, at)[0] == generation else None


class ShmChannel:
    """One connection to a server's ``--shm-socket``; blocking. Thread-safe: requests take turns.

    Invariants: from the shared L1, a result's tensors are copies whose entry kept its generation
    through the copy; from its own arena, an image's lease is released (with the next request) only
    once every tensor viewing it is gone: their storages all hold the one memoryview of the lease
    that carries its finalizer.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        metadata: Sequence[tuple[str, str]] = (),
        timeout_s: float = 30.0,
        shared_l1: bool = True,
    ):
        """``shared_l1``: ask for the server's L1 mapped read-only (results are copies); False, or a server
        that isolates tenants, gives this connection its own arena (results are views of it)."""
        self.timeout_s = timeout_s
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout_s)
            self._sock.connect(os.fspath(path))
            self._sock.sendall(json_frame({"metadata": [list(pair) for pair in metadata], "shared_l1": shared_l1}))
            welcome, fds, _, _ = socket.recv_fds(self._sock, 4096, 1)
            try:
                reply = self._read_json(welcome)
                if "error" in reply:
                    raise ShmRequestFailed(*reply["error"])
                if len(fds) != 1:
                    raise ConnectionError("the server sent no shared memory")
                self.arena_bytes = int(reply["arena_bytes"])
                self.max_images = int(reply["max_images"])
                self.shared_l1 = reply.get("shared_l1") is True
                arena = mmap.mmap(
                    fds[0],
                    self.arena_bytes,
                    prot=mmap.PROT_READ if self.shared_l1 else mmap.PROT_WRITE | mmap.PROT_READ,
                )
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
                chunk = digests[start : start + self.max_images]
                results += self._read_shared(chunk, start) if self.shared_l1 else self._fetch_chunk(chunk, start)
        return results

    def _read_shared(self, digests: Sequence[bytes], first_index: int) -> list[ShmResult]:
        """Results copied out of the shared L1; an image whose entry changed during its copy is looked up
        again, up to ``MAX_READS`` times in all, then fails with ABORTED (never torn bytes)."""
        results: dict[int, ShmResult] = {}
        pending = list(range(len(digests)))
        for _ in range(MAX_READS):
            replies = self._request([digests[i] for i in pending], [])
            retry = []
            for reply in replies:
                index = pending[int(reply["index"])]
                tensors = None if "error" in reply else copied_out(self._arena, reply)
                if tensors is None and "error" not in reply:
                    retry.append(index)
                    continue
                results[index] = self._result(reply | {"index": index}, first_index, tensors)
            if not (pending := retry):
                break
        for index in pending:
            error = (_ABORTED, f"the entry was replaced {MAX_READS} times while it was read; try again")
            results[index] = ShmResult(first_index + index, [], (), 0, error)
        return [results[i] for i in range(len(digests))]

    def _fetch_chunk(self, digests: Sequence[bytes], first_index: int) -> list[ShmResult]:
        releases = [self._released.popleft() for _ in range(len(self._released))]
        results = [self._result(r, first_index) for r in self._request(digests, releases)]
        return sorted(results, key=lambda r: r.index)

    def _request(self, digests: Sequence[bytes], releases: Sequence[int]) -> list[dict[str, Any]]:
        try:
            self._sock.sendall(request_frame(digests, releases))
            reply = self._read_json(b"")
        except BaseException:
            self.close()  # the server frees this connection's leases, the unsent releases among them
            raise
        if "error" in reply:
            raise ShmRequestFailed(*reply["error"])
        return reply["results"]

    def _result(self, result: dict[str, Any], first_index: int, copies: list[torch.Tensor] | None = None) -> ShmResult:
        """``result`` as an ShmResult: ``copies`` its tensors (shared L1), else views of this connection's arena."""
        index = first_index + int(result["index"])
        if "error" in result:
            code, message = result["error"]
            return ShmResult(index, [], (), 0, (int(code), str(message)))
        video = VideoTiming.from_json(result["video"]) if "video" in result else None
        if copies is not None:
            return ShmResult(index, copies, tuple(result["grid_thw"]), int(result["source"]), None, video)
        lease = int(result["lease"])
        outputs = result["outputs"]
        end = max((start + nbytes for _, _, start, nbytes in outputs), default=lease)
        if not 0 <= lease <= end <= self.arena_bytes:
            raise ValueError(f"server sent a lease [{lease}, {end}) outside the arena")
        region = self._arena[lease:end]
        weakref.finalize(region, self._released.append, lease).atexit = False
        tensors = [_tensor_at(region, start - lease, dtype, shape, nbytes) for dtype, shape, start, nbytes in outputs]
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
