"""The writer of the shared L1's index (layout and the readers' side: ``vitcache.wire.shm_index``).

Why: a same-host client that finds an entry here reads it out of the shared arena without asking the server.

Invariants (on top of the layout's):
- the serving process is the only writer, and it writes under the arena's lock (so under the L1's, which calls the
  arena); it never reads anything a client could write: the memfd is sealed against writes before any client gets
  it, and where each digest lies is kept here in private memory (``_slots``);
- a digest is in at most one slot; a slot holds a digest only while its block holds that digest's live entry
  (``publish`` after the block's generation store, ``withdraw`` before the block is marked dropped);
- a digest with no free slot among the ``PROBES`` from its home is left out: its hits take the round trip.
"""

from __future__ import annotations

import fcntl
import mmap
import os

from vitcache.wire.shm_index import FIELDS, PROBES, SEQ, SLOT_SIZE, home_slot, index_bytes

#: Linux >= 5.1: no new writable mapping and no write(2) (ours, made before it, stays writable);
#: not in Python 3.11's fcntl module.
F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)
#: Sealed before any client gets the memfd: no one can resize it (a shrunk file makes the server's next
#: write a SIGBUS), write to it or map it writable, or change these seals.
SHARED_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SEAL
SHARED_INDEX_NAME = "vitcache-l1-index"


def sealed_memfd(name: str, size: int) -> tuple[int, mmap.mmap]:
    """A 0600 memfd of ``size`` bytes, mapped writable here and then sealed (``SHARED_SEALS``)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, size)
        mapping = mmap.mmap(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SHARED_SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd, mapping


def read_only_fd(fd: int) -> int:
    """A new descriptor of memfd ``fd`` opened read-only (the caller closes it); with the seals, whoever holds it
    can map it for reading only."""
    return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)


class SharedIndex:
    """digest -> (block offset, generation) in a sealed memfd; not thread-safe (the arena's lock guards it)."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.fd, self._map = sealed_memfd(SHARED_INDEX_NAME, index_bytes(slots))
        self._view = memoryview(self._map)
        self._slots: dict[bytes, tuple[int, int]] = {}  # digest -> (slot, generation)
        self._taken: set[int] = set()
        self._seqs: dict[int, int] = {}  # slot -> its seq (even), for slots ever written

    def __len__(self) -> int:
        return len(self._slots)

    def publish(self, digest: bytes, at: int, generation: int) -> bool:
        """Points ``digest`` at the block at ``at`` holding ``generation``; False if no slot is free for it."""
        held = self._slots.get(digest)
        if held is not None:
            slot = held[0]
        else:
            home = home_slot(digest, self.slots)
            slot = next((s for s in range(home, home + PROBES) if s not in self._taken), -1)
            if slot < 0:
                return False
            self._taken.add(slot)
        self._slots[digest] = (slot, generation)
        self._write(slot, generation, at, digest)
        return True

    def withdraw(self, digest: bytes, generation: int) -> None:
        """Clears ``digest``'s slot if it still names ``generation`` (a replacement's stays)."""
        held = self._slots.get(digest)
        if held is None or held[1] != generation:
            return
        del self._slots[digest]
        self._taken.discard(held[0])
        self._write(held[0], 0, 0, bytes(len(digest)))

    def _write(self, slot: int, generation: int, at: int, digest: bytes) -> None:
        """One seqlock write: seq odd, the fields, seq even (three stores, in this order)."""
        offset = slot * SLOT_SIZE
        seq = self._seqs.get(slot, 0)
        SEQ.pack_into(self._view, offset, seq + 1)
        FIELDS.pack_into(self._view, offset + SEQ.size, generation, at, digest)
        SEQ.pack_into(self._view, offset, seq + 2)
        self._seqs[slot] = seq + 2

    def read_only_fd(self) -> int:
        return read_only_fd(self.fd)
