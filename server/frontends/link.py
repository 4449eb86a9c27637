"""The link's frames and what crosses it (the protocol is in the package's docstring)."""

from __future__ import annotations

import asyncio
import copyreg
import io
import pickle
import secrets
import struct
from dataclasses import dataclass
from typing import Any

from vitcache.cache.entry import CachedEmbedding
from vitcache.wire.tensor_codec import TensorBytes
from vitcache.wire.timing import VideoTiming

_LENGTH = struct.Struct("<Q")
SECRET_BYTES = 32
#: A front-end's first bytes: the secret, then its index and pid. Raw, not a pickle: the engine loads nothing a
#: connection sends before it has proved the secret (pickle runs code).
_HELLO = struct.Struct(f"<{SECRET_BYTES}sII")
HELLO_BYTES = _HELLO.size
#: The engine's calls a front-end may make, and whether each answers with a stream of outcomes.
CALLS = {"encode": True, "fetch": True, "fetch_keys": True, "put": False, "snapshot": False}
#: A memoryview (a request's payload, an entry's bytes) pickles as the bytes it shows.
_DISPATCH = copyreg.dispatch_table.copy()
_DISPATCH[memoryview] = lambda view: (bytes, (view.tobytes(),))


def frame(message: object) -> bytes:
    """``message`` as one frame: its length, then its pickle."""
    buffer = io.BytesIO()
    buffer.write(bytes(_LENGTH.size))
    pickler = pickle.Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = _DISPATCH
    pickler.dump(message)
    data = buffer.getbuffer()
    _LENGTH.pack_into(data, 0, len(data) - _LENGTH.size)
    return bytes(data)


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """The next message; IncompleteReadError when the other end has gone."""
    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    return pickle.loads(await reader.readexactly(length))


@dataclass(frozen=True)
class LinkAddress:
    """Where a front-end finds the engine, and the secret it proves itself with."""

    path: str
    secret: bytes

    def hello(self, index: int, pid: int) -> bytes:
        """What front-end ``index``, process ``pid``, sends first."""
        return _HELLO.pack(self.secret, index, pid)

    def sender_of(self, hello: bytes) -> tuple[int, int] | None:
        """The (index, pid) a ``hello`` of :data:`HELLO_BYTES` names; None unless it holds the secret."""
        secret, index, pid = _HELLO.unpack(hello)
        return (index, pid) if secrets.compare_digest(secret, self.secret) else None


@dataclass(frozen=True)
class ArenaRef:
    """An entry in the shared L1 arena: ``pin`` until released, and where each output lies in the arena."""

    pin: int
    grid_thw: tuple[int, int, int]
    outputs: tuple[tuple[str, tuple[int, ...], int, int], ...]  # (dtype, shape, offset, nbytes)
    video: VideoTiming | None

    def entry(self, arena: memoryview) -> CachedEmbedding:
        """The entry, viewing the front-end's read-only mapping of the arena."""
        return CachedEmbedding(
            self.grid_thw,
            tuple(TensorBytes(dtype, shape, arena[at : at + n]) for dtype, shape, at, n in self.outputs),
            self.video,
        )
