"""Client side of the same-host shared-memory path (frames: ``vitcache.wire.shm_protocol``).

Where the server shares its L1 (``shared_l1``), results are copied out of a read-only mapping of it
(the one copy a hit costs) and checked against their generation afterwards; otherwise they arrive as
CPU tensors viewing this connection's own arena, copied there by the server. With the L1's index
(``vitcache.wire.shm_index``) a hit is found without asking the server at all: only the misses make
a round trip, and the hits read that way are reported to the server in batches (``report_frame``): with
the next request, or once ``max_images`` are waiting, or by a background thread at most ``REPORT_INTERVAL_S``
after the hit, or at ``close``.
The server counts them in its stats and refreshes their recency in its LRU then. Nothing here touches CUDA.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import mmap
import os
import socket
import struct
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vitcache.wire.shm_index import HEADER_SPAN, MAX_HEADER_BYTES, find_slot, index_bytes, slot_seq
from vitcache.wire.shm_protocol import GENERATION, LENGTH, json_frame, report_frame, request_frame
from vitcache.wire.tensor_codec import dtype_from_name
from vitcache.wire.timing import VideoTiming

#: Lookups of an entry that was replaced while it was being copied, before its image fails with ABORTED.
MAX_READS = 3
_ABORTED = 10  # grpc.StatusCode.ABORTED
_L1 = 1  # the wire enum's Source.L1
#: Longest a hit read from the shared index waits, on an idle connection, before the server counts it.
REPORT_INTERVAL_S = 0.05


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
    through the copy (read through the index: and whose index slot did not change); from its own arena,
    an image's lease is released (with the next request) only once every tensor viewing it is gone:
    their storages all hold the one memoryview of the lease that carries its finalizer. At most
    ``max_images`` hits read from the index wait to be reported.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        metadata: Sequence[tuple[str, str]] = (),
        timeout_s: float = 30.0,
        shared_l1: bool = True,
        shared_index: bool = True,
    ):
        """``shared_l1``: ask for the server's L1 mapped read-only (results are copies); False, or a server
        that isolates tenants, gives this connection its own arena (results are views of it).
        ``shared_index``: with the shared L1, also ask for its index, to find hits without a round trip
        (a server gives it to connections without a tenant only)."""
        self.timeout_s = timeout_s
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        index: mmap.mmap | None = None
        try:
            self._sock.settimeout(timeout_s)
            self._sock.connect(os.fspath(path))
            pairs = [list(pair) for pair in metadata]
            self._sock.sendall(json_frame({"metadata": pairs, "shared_l1": shared_l1, "shared_index": shared_index}))
            welcome, fds, _, _ = socket.recv_fds(self._sock, 4096, 2)
            try:
                reply = self._read_json(welcome)
                if "error" in reply:
                    raise ShmRequestFailed(*reply["error"])
                self.index_slots = int(reply.get("index_slots", 0))
                if len(fds) != 1 + bool(self.index_slots):
                    raise ConnectionError("the server sent no shared memory")
                self.arena_bytes = int(reply["arena_bytes"])
                self.max_images = int(reply["max_images"])
                self.shared_l1 = reply.get("shared_l1") is True
                arena = mmap.mmap(
                    fds[0],
                    self.arena_bytes,
                    prot=mmap.PROT_READ if self.shared_l1 else mmap.PROT_WRITE | mmap.PROT_READ,
                )
                if self.index_slots:
                    size = index_bytes(self.index_slots)
                    if os.fstat(fds[1]).st_size < size:  # reading past its end would be a SIGBUS
                        raise ConnectionError(f"the server sent an index smaller than {self.index_slots} slots")
                    index = mmap.mmap(fds[1], size, prot=mmap.PROT_READ)
            finally:
                for fd in fds:
                    os.close(fd)
        except BaseException:
            self._sock.close()
            raise
        # Not closed explicitly: tensors may outlive the channel; the mapping goes with the last view.
        self._arena = memoryview(arena)
        self._index = None if index is None else memoryview(index)
        self._index_hits: list[bytes] = []  # read from the index, not yet reported
        self._released: collections.deque[int] = collections.deque()
        self._turn = threading.Lock()
        self._closed = threading.Event()
        if self._index is not None:
            reporter = threading.Thread(
                target=_report_while_open, args=(weakref.ref(self), self._closed), name="vitcache-shm-report"
            )
            reporter.daemon = True
            reporter.start()

    def close(self) -> None:
        """Reports the hits read from the index not yet reported, and ends the connection; tensors already
        received stay valid."""
        with self._turn, contextlib.suppress(OSError):
            self._send_report()
        self._disconnect()

    def _disconnect(self) -> None:
        self._closed.set()
        self._sock.close()

    def _send_report(self) -> None:
        """Sends the hits read from the index since the last report (no reply comes); call with the turn held.
        A connection that fails to send is closed: a gone server's index would answer hits no one counts."""
        if self._index_hits:
            try:
                self._sock.sendall(self._report())
            except BaseException:
                self._disconnect()
                raise

    def _report(self) -> bytes:
        """The frames that report the hits not yet reported (none are left to report after)."""
        hits, self._index_hits = self._index_hits, []
        return b"".join(report_frame(hits[i : i + self.max_images]) for i in range(0, len(hits), self.max_images))

    def fetch(self, digests: Sequence[bytes], timeout: float | None = None) -> list[ShmResult]:
        """Cached embeddings by digest, in input order; misses carry NOT_FOUND."""
        timeout_s = timeout if timeout is not None else self.timeout_s
        if self._closed.is_set():  # the index would still answer: its hits could no longer be reported
            raise ConnectionError("the shared memory connection is closed")
        with self._turn:
            if self._sock.gettimeout() != timeout_s:  # a system call otherwise spent on every lookup
                self._sock.settimeout(timeout_s)
            if not self.shared_l1:
                results: list[ShmResult] = []
                for start in range(0, len(digests), self.max_images):
                    results += self._fetch_chunk(digests[start : start + self.max_images], start)
                return results
            found: dict[int, ShmResult] = {}
            if self._index is not None:
                found = {i: hit for i, digest in enumerate(digests) if (hit := self._from_index(digest, i)) is not None}
                if len(self._index_hits) >= self.max_images:  # a busy caller may leave the reporter no turn
                    self._send_report()
            asked = [i for i in range(len(digests)) if i not in found]
            for start in range(0, len(asked), self.max_images):
                found |= self._read_shared(digests, asked[start : start + self.max_images])
        return [found[i] for i in range(len(digests))]

    def _from_index(self, digest: bytes, index: int) -> ShmResult | None:
        """``digest``'s entry read through the shared index with no round trip; None if it is not there, or its
        slot or block changed before the copy was checked (then the server is asked)."""
        located = self._locate(digest)
        if located is None:
            return None
        try:
            tensors = copied_out(self._arena, located)
        except (ValueError, KeyError, TypeError):  # a header torn by a concurrent rewrite: its generation changed
            return None
        if tensors is None or slot_seq(self._index, located["slot"]) != located["seq"]:
            return None
        self._index_hits.append(digest)
        return self._result(located | {"index": index}, 0, tensors)

    def _locate(self, digest: bytes) -> dict[str, Any] | None:
        """Where the index says ``digest``'s entry lies, with its block's header, as a shared-L1 result (plus
        the slot and its seq, checked again after the copy); None if it is not there or no longer."""
        assert self._index is not None
        found = find_slot(self._index, self.index_slots, digest)
        if found is None:
            return None
        slot, seq, at, generation = found
        try:
            if GENERATION.unpack_from(self._arena, at)[0] != generation:
                return None
            header_at, header_len = HEADER_SPAN.unpack_from(self._arena, at + GENERATION.size)
            if header_len > MAX_HEADER_BYTES:
                return None
            header = json.loads(bytes(self._arena[at + header_at : at + header_at + header_len]))
            if header["digest"] != digest.hex():
                return None
            outputs = [[dtype, shape, at + int(off), int(nbytes)] for dtype, shape, off, nbytes in header["outputs"]]
            grid_thw = [int(n) for n in header["grid_thw"]]
        except (ValueError, KeyError, TypeError, struct.error):  # torn by a concurrent rewrite: not a hit this way
            return None
        located = {"at": at, "generation": generation, "grid_thw": grid_thw, "outputs": outputs, "source": _L1}
        if "video" in header:  # whole if the copy is: the header is read before the generation is checked again
            located["video"] = header["video"]
        return located | {"slot": slot, "seq": seq}

    def _read_shared(self, digests: Sequence[bytes], indices: Sequence[int]) -> dict[int, ShmResult]:
        """Results of ``digests[i]`` for each of ``indices``, copied out of the shared L1; an image whose entry
        changed during its copy is looked up again, up to ``MAX_READS`` times in all, then fails with ABORTED
        (never torn bytes)."""
        results: dict[int, ShmResult] = {}
        pending = list(indices)
        for _ in range(MAX_READS):
            replies = self._request([digests[i] for i in pending], [])
            retry = []
            for reply in replies:
                index = pending[int(reply["index"])]
                tensors = None if "error" in reply else copied_out(self._arena, reply)
                if tensors is None and "error" not in reply:
                    retry.append(index)
                    continue
                results[index] = self._result(reply | {"index": index}, 0, tensors)
            if not (pending := retry):
                break
        for index in pending:
            error = (_ABORTED, f"the entry was replaced {MAX_READS} times while it was read; try again")
            results[index] = ShmResult(index, [], (), 0, error)
        return results

    def _fetch_chunk(self, digests: Sequence[bytes], first_index: int) -> list[ShmResult]:
        releases = [self._released.popleft() for _ in range(len(self._released))]
        results = [self._result(r, first_index) for r in self._request(digests, releases)]
        return sorted(results, key=lambda r: r.index)

    def _request(self, digests: Sequence[bytes], releases: Sequence[int]) -> list[dict[str, Any]]:
        try:
            self._sock.sendall(self._report() + request_frame(digests, releases))  # the pending report rides along
            reply = self._read_json(b"")
        except BaseException:
            self._disconnect()  # the server frees this connection's leases, the unsent releases among them
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


def _report_while_open(channel_ref: weakref.ref[ShmChannel], closed: threading.Event) -> None:
    """Every ``REPORT_INTERVAL_S``, reports the index hits of a channel no request has reported (the fetch path
    makes no system call for them); ends with the channel, or when its connection fails."""
    while not closed.wait(REPORT_INTERVAL_S):
        channel = channel_ref()
        if channel is None:
            return
        if channel._index_hits and channel._turn.acquire(blocking=False):  # busy: its request carries them
            try:
                channel._send_report()
            except OSError:
                return
            finally:
                channel._turn.release()
        del channel
