"""The shared L1's index: digest -> (block offset, generation), which same-host clients read themselves.

Why: with it an L1 hit needs no round trip over the Unix socket; the client finds the entry, copies its
bytes out of its read-only mapping of the arena and checks that nothing changed meanwhile.

The index is a sealed memfd (read-only to clients, written by the serving process alone) of
``slots + PROBES - 1`` slots of ``SLOT_SIZE`` bytes. A digest's home is
``home_slot``; it lies in one of the ``PROBES`` slots from its home on (no wrap-around: the table has
``PROBES - 1`` slots past the last home). A digest the writer finds no free slot for there is not indexed
(its hits take the round trip). Each slot::

    seq (u64) | generation (u64) | block offset (u64) | digest (16 bytes) | zeros to SLOT_SIZE

Each arena block starts with its generation (u64), then ``HEADER_SPAN``: where in the block its header lies
(offset from the block's start, length). The header is JSON, written with the block before its generation::

    {"digest": hex, "grid_thw": [t, h, w], "outputs": [[dtype, shape, offset from the block's start, nbytes], ...],
     "video": VideoTiming.to_json()}   (video: a clip's only)

Invariants (seqlock per slot; x86-64 store and load order, as ``vitcache.cache.arena`` relies on):
- the writer makes ``seq`` odd, writes the other fields, then makes ``seq`` even again; an even ``seq`` read before
  and after the fields means they are one write's;
- a slot names (offset, generation) only after that block's generation store, and is cleared before the block is
  dropped: a reader whose block generation and slot ``seq`` are unchanged after its copy copied that entry whole.
Readers lock nothing and write nothing: any mismatch means "not a hit this way", never bytes of another entry.
"""

from __future__ import annotations

import struct

from vitcache.digest import DIGEST_SIZE

SEQ = struct.Struct("<Q")
FIELDS = struct.Struct(f"<QQ{DIGEST_SIZE}s")  # after seq: generation, block offset, digest
SLOT_SIZE = 64  # a cache line: a slot never straddles two
DIGEST_IN_SLOT = SEQ.size + FIELDS.size - DIGEST_SIZE
#: Slots from a digest's home where it may lie: a lookup reads them all (a miss costs one short read).
PROBES = 8
#: After a shared-L1 block's generation: its header's offset from the block's start and its length.
HEADER_SPAN = struct.Struct("<II")
#: Largest header a reader accepts: one entry's outputs and timing.
MAX_HEADER_BYTES = 64 << 10
#: Arena bytes per slot: the table is sized from the arena's capacity (1/64 of it: 18 MiB for --l1-bytes 1 GiB).
ARENA_BYTES_PER_SLOT = 4096
MIN_SLOTS = 64


def slot_count(arena_bytes: int) -> int:
    """Homes for an arena of ``arena_bytes``: one per ``ARENA_BYTES_PER_SLOT``."""
    return max(MIN_SLOTS, arena_bytes // ARENA_BYTES_PER_SLOT)


def index_bytes(slots: int) -> int:
    return (slots + PROBES - 1) * SLOT_SIZE


def home_slot(digest: bytes, slots: int) -> int:
    """Digests are uniform hashes: their low bytes spread them over the table."""
    return int.from_bytes(digest[:8], "little") % slots


def find_slot(index: memoryview, slots: int, digest: bytes) -> tuple[int, int, int, int] | None:
    """(slot's byte offset, its seq, block offset, generation) of ``digest``, as read once; None if it is not there
    or its slot is being written."""
    start = home_slot(digest, slots) * SLOT_SIZE
    window = bytes(index[start : start + PROBES * SLOT_SIZE])
    found = window.find(digest)
    while found != -1 and found % SLOT_SIZE != DIGEST_IN_SLOT:
        found = window.find(digest, found + 1)
    if found == -1:
        return None
    at_slot = start + found - DIGEST_IN_SLOT
    seq = slot_seq(index, at_slot)  # three reads, in this order: seq, fields, seq
    generation, at, slot_digest = FIELDS.unpack_from(index, at_slot + SEQ.size)
    if seq % 2 or slot_digest != digest or slot_seq(index, at_slot) != seq:
        return None
    return at_slot, seq, at, generation


def slot_seq(index: memoryview, at_slot: int) -> int:
    return SEQ.unpack_from(index, at_slot)[0]
