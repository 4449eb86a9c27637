"""A shared-memory client process for tests/test_shm.py: fetches in a loop, holding its
latest results (so it dies holding leases), until it is killed or its bounds run out.

    python -m tests.shm_client_process SOCKET DIGEST_HEX...
"""

from __future__ import annotations

import collections
import sys
import time

from vitcache.client.shm import ShmChannel

MAX_REQUESTS = 10_000
MAX_SECONDS = 60.0


def main() -> None:
    path, *hex_digests = sys.argv[1:]
    digests = [bytes.fromhex(h) for h in hex_digests]
    channel = ShmChannel(path, shared_l1=False)  # its own arena: it dies holding leases
    held: collections.deque[object] = collections.deque(maxlen=8)
    deadline = time.monotonic() + MAX_SECONDS
    for done in range(1, MAX_REQUESTS + 1):
        if time.monotonic() > deadline:
            break
        results = channel.fetch(digests)
        if any(r.error is not None for r in results):
            raise SystemExit(f"unexpected error: {[r.error for r in results]}")
        held.append(results)
        print(done, flush=True)


if __name__ == "__main__":
    main()
