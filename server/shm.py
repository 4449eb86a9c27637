"""Same-host delivery in shared memory: ``vitcache serve --shm-socket PATH`` (frames: ``vitcache.wire.shm_protocol``).

Why memfds passed over the socket rather than named ``/dev/shm`` segments: a memfd has no
name in any file system, so nothing can outlive the processes that map it; a killed client
or a killed server leaves nothing behind to clean up.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import mmap
import os
import socket
import stat
from pathlib import Path
from typing import Any

from vitcache.server.security import Access, AccessDenied
from vitcache.server.status import wire_code

from vitcache.cache.arena import ArenaEntry, FirstFitLeases
from vitcache.cache.entry import CachedEmbedding
from vitcache.cache.l1 import l1_key
from vitcache.engine import EmbeddingEngine, Scope
from vitcache.errors import ErrorCode
from vitcache.outcomes import ImageOutcome
from vitcache.wire.shm_protocol import (
    ALIGNMENT,
    LENGTH,
    MAX_HELLO_BYTES,
    MEMFD_NAME,
    REPORT,
    REQUEST,
    aligned,
    json_frame,
    parse_request_body,
    request_body_size,
)

log = logging.getLogger(__name__)


#: What the client may not do to its arena's memfd: resize it (a shrunk file would make the server's
#: next write into its mapping a SIGBUS, which kills the whole server), or change these seals.
#: Not F_SEAL_WRITE: the server writes through its mapping; a client that scribbles on the
#: memory through its own mapping only spoils results it alone reads.
ARENA_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class Arena:
    """One connection's shared memory: a 0600 memfd mapped here, whose fd the client gets.

    Invariants:
    - the server writes a leased range once, before the reply that names it, and not again
      until the client has released it; the client's tensors never see a change;
    - the memfd is sealed (``ARENA_SEALS``) before the client gets it: its size never changes.
    """

    def __init__(self, capacity: int) -> None:
        fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, capacity)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, ARENA_SEALS)
            self.map = mmap.mmap(fd, capacity)
        except BaseException:
            os.close(fd)
            raise
        self.fd: int | None = fd
        self.leases = FirstFitLeases(capacity)

    def place(self, entry: CachedEmbedding) -> dict[str, Any] | None:
        """Copies ``entry`` into a new lease; None when the arena has no room for it."""
        offsets, size = [], 0
        for out in entry.outputs:
            offsets.append(size)
            size += aligned(out.nbytes)
        lease = self.leases.lease(size)
        if lease is None:
            return None
        outputs = []
        for out, offset in zip(entry.outputs, offsets, strict=True):
            start = lease + offset
            self.map[start : start + out.nbytes] = out.data
            outputs.append([out.dtype, list(out.shape), start, out.nbytes])
        return {"lease": lease, "grid_thw": list(entry.grid_thw), "outputs": outputs} | _timing(entry)

    def close_fd(self) -> None:
        """Once the client holds the fd, the mapping alone keeps the memory alive here."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def close(self) -> None:
        self.close_fd()
        self.map.close()


class _Disconnect(Exception):
    """The client closed the connection, or broke the protocol so that no reply can follow."""


async def _read(reader: asyncio.StreamReader, size: int) -> bytes:
    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError as exc:
        raise _Disconnect("connection closed") from exc


def _error(code: ErrorCode, message: str) -> dict[str, Any]:
    return {"error": [wire_code(code), message]}


def _prepare_socket_path(path: Path) -> None:
    """Makes ``path``'s directory private (0700, ours) and removes a dead server's socket."""
    directory = path.parent
    if not directory.exists():
        directory.mkdir(parents=True)
        directory.chmod(0o700)
    info = directory.stat()
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise PermissionError(f"{directory} must belong to this user and be closed to others (chmod 700)")
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise FileExistsError(f"{path} exists and is not a socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(str(path)) == 0:
                raise FileExistsError(f"another server listens on {path}")
        path.unlink()


class ShmServer:
    """Answers digest lookups on a Unix socket, from the L1's shared arena or through the caller's own arena.

    Two ways to deliver a hit (``vitcache.wire.shm_protocol``):
    - shared L1: the client maps the L1's arena (``SharedArena``) read-only and gets where each entry
      lies; the server copies nothing. Offered only where tenants are no boundary (no token is bound to
      a tenant, so any caller may act as any tenant): the mapping holds every tenant's entries. A client
      without a tenant may also map the arena's index and find hits without asking (it reports them after);
    - own arena: each entry is copied into the connection's arena (every other case, and clients that
      do not ask for the shared L1).

    Invariants:
    - the socket lives in a directory only this user can enter (0700) and is itself 0600;
      arenas are 0600 memfds with no name, reachable only through the connection; the shared L1's
      descriptor is read-only and its memfd sealed against writes and resizing;
    - a connection's arena is unmapped here when the connection ends, however it ends
      (a killed client's socket is closed by its kernel), so memory lives only as long as
      some process maps it;
    - a malformed request ends only its own connection; a bad digest, a miss or a full
      arena fails only its own image.
    """

    def __init__(
        self,
        engine: EmbeddingEngine,
        path: str | os.PathLike,
        arena_bytes: int,
        max_images_per_request: int,
        access: Access | None = None,
    ) -> None:
        if arena_bytes < ALIGNMENT:
            raise ValueError(f"arena_bytes must be at least {ALIGNMENT}")
        self.engine = engine
        self.path = Path(path)
        self.arena_bytes = arena_bytes
        self.max_images_per_request = max_images_per_request
        self.access = access or Access.open()
        arena = engine.l1.arena
        self.shared_l1 = arena if arena is not None and not self.access.tenants_isolated else None
        self.connections = 0
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._arenas: set[Arena] = set()

    @property
    def leased_bytes(self) -> int:
        return sum(arena.leases.leased_bytes for arena in self._arenas)

    async def start(self) -> None:
        _prepare_socket_path(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.path))
            self.path.chmod(0o600)
            listener.listen(128)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self._accepting = asyncio.get_running_loop().create_task(self._accept(), name="vitcache-shm-accept")
        shared = "the L1 shared read-only" if self.shared_l1 is not None else "no shared L1 (tenants are isolated)"
        log.info("shared memory on %s (%d bytes per client; %s)", self.path, self.arena_bytes, shared)

    async def stop(self) -> None:
        tasks = [t for t in (self._accepting, *self._connections) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            self.path.unlink(missing_ok=True)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            try:
                conn, _ = await loop.sock_accept(self._listener)
            except OSError as exc:  # out of file descriptors, say: the connections already open go on
                log.warning("shm socket: accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            task = loop.create_task(self._serve(conn), name="vitcache-shm-client")
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _serve(self, conn: socket.socket) -> None:
        arena: Arena | None = None
        counted = False
        reader, writer = await asyncio.open_unix_connection(sock=conn)
        try:
            scope, wants_shared_l1, wants_index = await self._hello(reader, writer)
            welcome: dict[str, Any] = {"max_images": self.max_images_per_request}
            indexed = False
            if wants_shared_l1 and self.shared_l1 is not None:
                welcome |= {"arena_bytes": self.shared_l1.capacity, "shared_l1": True}
                fds = [self.shared_l1.read_only_fd()]
                indexed = wants_index and not scope.tenant  # the index holds tenant-less entries only
                if indexed:
                    welcome |= {"index_slots": self.shared_l1.index.slots}
                    fds.append(self.shared_l1.index.read_only_fd())
            else:
                arena = Arena(self.arena_bytes)
                self._arenas.add(arena)
                welcome |= {"arena_bytes": self.arena_bytes}
                assert arena.fd is not None
                fds = [arena.fd]
            try:
                # Past the stream, which holds nothing yet: the first bytes on an empty send buffer never block.
                socket.send_fds(conn, [json_frame(welcome)], fds)
            finally:
                if arena is None:
                    for fd in fds:
                        os.close(fd)
                else:
                    arena.close_fd()
            self.connections += 1
            counted = True
            while True:
                await self._answer(reader, writer, arena, scope, indexed)
        except _Disconnect as why:
            log.debug("shm client gone: %s", why)
        except OSError as exc:
            log.debug("shm client connection failed: %s", exc)
        except Exception:  # a fault in this connection ends it alone, at once, and is told
            log.exception("shm client connection ended by an unexpected error")
        finally:
            writer.close()
            self.connections -= counted
            if arena is not None:
                self._arenas.discard(arena)
                arena.close()

    async def _hello(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[Scope, bool, bool]:
        """The caller's scope, and whether it asks for the shared L1 and for its index."""
        (size,) = LENGTH.unpack(await _read(reader, LENGTH.size))
        if size > MAX_HELLO_BYTES:
            raise _Disconnect(f"hello of {size} bytes")
        try:
            hello = json.loads(await _read(reader, size))
            metadata = [(str(key), str(value)) for key, value in hello["metadata"]]
            wants_shared_l1 = hello.get("shared_l1") is True
            wants_index = hello.get("shared_index") is True
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise _Disconnect(f"malformed hello: {exc}") from exc
        try:
            tenant = self.access.tenant(metadata)
        except AccessDenied as denied:
            writer.write(json_frame(_error(denied.code, denied.message)))
            await writer.drain()
            raise _Disconnect(denied.message) from denied
        return Scope(tenant), wants_shared_l1, wants_index

    async def _answer(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        arena: Arena | None,
        scope: Scope,
        indexed: bool,
    ) -> None:
        """One request: results located in the shared L1 (``arena`` None) or placed in ``arena``; or one report
        of hits the client read from the shared index (``indexed``), counted and not answered."""
        leases = 0 if arena is None else len(arena.leases)
        digest_count, release_count = REQUEST.unpack(await _read(reader, REQUEST.size))
        report = indexed and bool(digest_count & REPORT)  # elsewhere the bit makes the count too large
        if report:
            digest_count ^= REPORT
        if digest_count > self.max_images_per_request or release_count > leases:
            message = (
                f"{digest_count} digests and {release_count} releases: at most "
                f"--max-images-per-request={self.max_images_per_request} and the {leases} leases held"
            )
            writer.write(json_frame(_error(ErrorCode.INVALID_ARGUMENT, message)))
            await writer.drain()
            raise _Disconnect(message)
        body = await _read(reader, request_body_size(digest_count, release_count))
        digests, releases = parse_request_body(body, digest_count, release_count)
        if report:  # no releases: a shared L1 holds no leases
            self.engine.count_shared_index_hits(digests, scope)
            return
        unknown = [lease for lease in releases if arena is None or not arena.leases.release(lease)]
        if unknown:
            reply = _error(ErrorCode.INVALID_ARGUMENT, f"leases {unknown} are not held by this connection")
        else:
            outcomes = self.engine.fetch(digests, scope)
            reply = {"results": [self._result(arena, outcome, scope) async for outcome in outcomes]}
        writer.write(json_frame(reply))
        await writer.drain()

    def _result(self, arena: Arena | None, outcome: ImageOutcome, scope: Scope) -> dict[str, Any]:
        result: dict[str, Any] = {"index": outcome.index}
        if outcome.error is not None:
            return result | _error(outcome.error.code, outcome.error.message)
        assert outcome.entry is not None and outcome.source is not None
        if arena is not None:
            placed = arena.place(outcome.entry)
        else:  # an L2 hit's entry is the one read from Redis; L1 holds its copy in the shared arena
            placed = _located(outcome.entry) or _located(self.engine.l1.get(l1_key(outcome.digest, scope.tenant)))
        if placed is None:
            return result | _error(ErrorCode.RESOURCE_EXHAUSTED, _no_room(arena))
        return result | placed | {"source": int(outcome.source)}


def _located(entry: CachedEmbedding | None) -> dict[str, Any] | None:
    """Where ``entry`` lies in the shared L1; None for an entry held outside it."""
    if not isinstance(entry, ArenaEntry):
        return None
    offsets = entry.output_offsets()
    outputs = [[out.dtype, list(out.shape), at, out.nbytes] for out, at in zip(entry.outputs, offsets, strict=True)]
    located = {"at": entry.at, "generation": entry.generation, "grid_thw": list(entry.grid_thw), "outputs": outputs}
    return located | _timing(entry)


def _timing(entry: CachedEmbedding) -> dict[str, Any]:
    """A video's timing for its result (nothing for an image)."""
    return {} if entry.video is None else {"video": entry.video.to_json()}


def _no_room(arena: Arena | None) -> str:
    if arena is None:
        return "entry not in the shared L1 (its arena was full when it was stored)"
    return (
        f"shared memory arena full ({arena.leases.leased_bytes} of {arena.leases.capacity} bytes leased): "
        "drop tensors of earlier results, or raise --shm-arena-bytes"
    )
