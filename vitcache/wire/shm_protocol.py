"""Frames of the same-host shared-memory path (``vitcache serve --shm-socket``).

A client connects to the server's Unix socket and says hello; the server answers with a
memfd (passed with SCM_RIGHTS): the L1's shared arena, read-only, when the client asked for it
and the server shares it (``vitcache.cache.arena``); else an arena of this connection's own.
With the shared arena, a client without a tenant that asks for it also gets the arena's index
(``vitcache.wire.shm_index``), a second memfd, read-only.

- shared L1: a hit names where the entry lies and its generation; the server copies nothing, the
  client copies the bytes out and then checks the generation (changed: look it up again).
- shared index: the client looks each digest up in the index itself and asks only for the others;
  it reports the hits it read that way in later frames (report), which the server counts as L1 hits
  and which refresh the entries' recency.
- own arena: the server copies each hit into the arena once; the client's tensors view it.

Frames (integers little-endian)::

    hello    client -> server  u32 n, n bytes of JSON {"metadata": [[key, value], ...], "shared_l1": bool,
                               "shared_index": bool} (token, tenant; shared_l1, shared_index absent: false)
    welcome  server -> client  u32 n, n bytes of JSON {"arena_bytes": int, "max_images": int, "shared_l1": true?,
                               "index_slots": int?}, the memfd (and the index's, with index_slots); or
                               {"error": [code, message]}, and the server closes the connection
    request  client -> server  u32 digests, u32 releases, 16 bytes per digest, u64 per released lease (own arena)
    report   client -> server  u32 (REPORT | hits), u32 0, 16 bytes per digest read from the index; no reply
    reply    server -> client  u32 n, n bytes of JSON {"results": [result, ...]} or {"error": [code, message]}

A result is ``{"index", "grid_thw", "source", "outputs": [[dtype, shape, offset, nbytes], ...]}`` plus
``"at", "generation"`` (shared L1: the entry's block and the generation the client checks after its copy) or
``"lease"`` (own arena), and ``"video"`` (``VideoTiming.to_json()``) for a video; or
``{"index", "error": [code, message]}``. Codes are grpc.StatusCode numbers, offsets are into the mapped memfd.
A lease is the offset of an image's range; the client releases it in a later request once no tensor views it,
and the server reuses the range only after that (or after the connection closed).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Any

from vitcache.digest import DIGEST_SIZE

LENGTH = struct.Struct("<I")
REQUEST = struct.Struct("<II")
LEASE_SIZE = 8
#: Set in a frame's first u32: a report of hits read from the shared index (at most max_images digests).
REPORT = 1 << 31
#: Largest hello the server reads; a welcome or reply is bounded by the server's own limits.
MAX_HELLO_BYTES = 64 << 10
#: Alignment of every tensor in an arena: a cache line, and a multiple of every dtype's size.
ALIGNMENT = 64
MEMFD_NAME = "vitcache-shm"

#: The u64 at the start of a shared-L1 block (``vitcache.cache.arena``): a reader compares it after its copy.
GENERATION = struct.Struct("<Q")


def json_frame(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return LENGTH.pack(len(body)) + body


def request_frame(digests: Sequence[bytes], releases: Sequence[int]) -> bytes:
    if any(len(d) != DIGEST_SIZE for d in digests):
        raise ValueError(f"digests must be {DIGEST_SIZE} bytes")
    return b"".join([REQUEST.pack(len(digests), len(releases)), *digests, struct.pack(f"<{len(releases)}Q", *releases)])


def report_frame(digests: Sequence[bytes]) -> bytes:
    return REQUEST.pack(REPORT | len(digests), 0) + b"".join(digests)


def request_body_size(digests: int, releases: int) -> int:
    return digests * DIGEST_SIZE + releases * LEASE_SIZE


def parse_request_body(body: bytes, digests: int, releases: int) -> tuple[list[bytes], list[int]]:
    split = digests * DIGEST_SIZE
    return (
        [body[i : i + DIGEST_SIZE] for i in range(0, split, DIGEST_SIZE)],
        list(struct.unpack_from(f"<{releases}Q", body, split)),
    )


def aligned(size: int) -> int:
    return -(-size // ALIGNMENT) * ALIGNMENT
