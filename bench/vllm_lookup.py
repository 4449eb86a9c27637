"""Cost of the vLLM connector's scheduler-side existence check: one metadata-only Fetch per call.

    .venv/bin/python bench/vllm_lookup.py      # ~20 s; prints a table

vLLM's scheduler asks ``has_cache_item`` for each image on its hot path; the connector batches a request's
images into one ``Fetch(keys=..., metadata_only=True)`` and memoises the answers. This measures that Fetch against
a server on loopback (tiny-random model; the entries are Put keys of one 256x3584 bf16 tensor, the size of a
Qwen2.5-VL-7B 448x448 image, which metadata_only never sends), for 1 and 16 identifiers, all present or all absent.
"""

from __future__ import annotations

import statistics
import time

import torch
from run_info import commit
from vitcache.client import VitCacheClient
from vitcache.server.background import BackgroundServer

from vitcache.config import VitcacheConfig

ROUNDS = 300


def per_call_us(client: VitCacheClient, keys: list[str]) -> float:
    """Median microseconds of one metadata-only Fetch of ``keys``."""
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        client.fetch(keys=keys, metadata_only=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    server = BackgroundServer(VitcacheConfig.of(port=0))
    try:
        with VitCacheClient(server.target) as client:
            present = [f"{'b3' * 31}{i:02x}" for i in range(16)]
            client.put({key: [torch.zeros(256, 3584, dtype=torch.bfloat16)] for key in present})
            absent = [f"{'ab' * 31}{i:02x}" for i in range(16)]
            per_call_us(client, present)  # warm-up
            print(f"commit {commit()}: metadata-only Fetch, median of {ROUNDS} calls (loopback gRPC)")
            print(f"{'identifiers':>12} {'present us':>11} {'absent us':>10}")
            for count in (1, 16):
                hit, miss = per_call_us(client, present[:count]), per_call_us(client, absent[:count])
                print(f"{count:>12} {hit:>11.0f} {miss:>10.0f}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
