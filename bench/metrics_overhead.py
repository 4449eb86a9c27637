"""What the metrics cost: the engine's observer on the L1-hit path, a served hit, a scrape, a dashboard poll.

    .venv/bin/python bench/metrics_overhead.py     # ~30 s on 2 cores; prints a table, writes bench/results/

Two engines over the same L1 entries answer the same digest-only requests (all L1 hits, the
hottest path and so where per-image metrics weigh most): one with the no-op ``EngineObserver``
(the baseline the ratio divides by), one with the server's Prometheus ``ServerMetrics``. They
run round-robin in one loop, so a busy machine slows both alike. Beside them: one hit through a
real gRPC server on loopback (client ``fetch``, metrics on, as served), a ``/metrics`` scrape and
an ``/api/stats`` computation on that server after the traffic.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import time
import urllib.request
from pathlib import Path

import torch
from vitcache.client import VitCacheClient
from vitcache.server.app import start_server
from vitcache.server.metrics import ServerMetrics

from vitcache.cache.entry import CachedEmbedding
from vitcache.cache.l1 import L1Cache
from vitcache.config import ModelConfig, VitcacheConfig
from vitcache.digest import digest_file
from vitcache.engine import EmbeddingEngine
from vitcache.models.loading import load_encoder
from vitcache.observer import EngineObserver

REPO = Path(__file__).resolve().parent.parent
IMAGES_PER_REQUEST = 16


def entries(count: int) -> dict[bytes, CachedEmbedding]:
    return {
        digest_file(f"metrics-bench-{i}".encode()): CachedEmbedding.from_tensors((1, 8, 8), [torch.randn(16, 64)])
        for i in range(count)
    }


async def engine_hits(rounds: int) -> dict[str, list[float]]:
    """Seconds per image of digest-only L1 hits, per round, for each observer."""
    encoder = load_encoder(ModelConfig("tiny-random"))
    cached = entries(IMAGES_PER_REQUEST)
    engines = {}
    for name, observer in (("no-op observer", EngineObserver()), ("prometheus", ServerMetrics())):
        l1 = L1Cache(1 << 30)
        for digest, entry in cached.items():
            l1.put(digest, entry)
        engines[name] = EmbeddingEngine(encoder, l1, observer=observer)
    per_image: dict[str, list[float]] = {name: [] for name in engines}
    digests = list(cached)
    for _ in range(rounds):
        for name, engine in engines.items():
            start = time.perf_counter()
            for _ in range(50):
                async for _outcome in engine.fetch(digests):
                    pass
            per_image[name].append((time.perf_counter() - start) / (50 * len(digests)))
    for engine in engines.values():
        await engine.stop()
    return per_image


async def served(requests: int) -> dict[str, float]:
    """Seconds for one served hit (gRPC, metrics on), one /metrics scrape and one /api/stats."""
    running = await start_server(VitcacheConfig.of(port=0, metrics_port=0))
    try:
        for digest, entry in entries(IMAGES_PER_REQUEST).items():
            running.engine.l1.put(digest, entry)
        digests = [digest_file(f"metrics-bench-{i}".encode()) for i in range(IMAGES_PER_REQUEST)]
        target, base = f"127.0.0.1:{running.port}", f"http://127.0.0.1:{running.metrics_port}"

        def measure() -> dict[str, float]:
            with VitCacheClient(target) as client:
                client.fetch(digests)
                start = time.perf_counter()
                for _ in range(requests):
                    client.fetch(digests)
                request_s = (time.perf_counter() - start) / requests

            def get(path: str) -> float:
                times = []
                for _ in range(20):
                    start = time.perf_counter()
                    with urllib.request.urlopen(base + path) as response:
                        response.read()
                    times.append(time.perf_counter() - start)
                return statistics.median(times)

            return {"fetch_request_s": request_s, "scrape_s": get("/metrics"), "api_stats_s": get("/api/stats")}

        return await asyncio.get_running_loop().run_in_executor(None, measure)
    finally:
        await running.stop(grace_s=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--out", type=Path, default=REPO / "bench/results")
    args = parser.parse_args()

    hits = asyncio.run(engine_hits(args.rounds))
    base = statistics.median(hits["no-op observer"])
    with_metrics = statistics.median(hits["prometheus"])
    requests = asyncio.run(served(args.requests))
    overhead = with_metrics - base
    request_per_image = requests["fetch_request_s"] / IMAGES_PER_REQUEST

    print(f"L1-hit path, digest-only fetch of {IMAGES_PER_REQUEST} images, median of {args.rounds} rounds")
    print(f"  {'observer':<18}{'us/image':>10}{'ratio':>8}")
    for name, value in (("no-op observer", base), ("prometheus", with_metrics)):
        print(f"  {name:<18}{value * 1e6:>10.2f}{value / base:>8.2f}")
    print(f"metrics cost per image: {overhead * 1e6:.2f} us")
    print(
        f"one served gRPC fetch of {IMAGES_PER_REQUEST} hits: {requests['fetch_request_s'] * 1e3:.2f} ms "
        f"({request_per_image * 1e6:.1f} us/image); metrics are {overhead / request_per_image:.1%} of it"
    )
    print(f"/metrics scrape: {requests['scrape_s'] * 1e3:.2f} ms   /api/stats: {requests['api_stats_s'] * 1e3:.2f} ms")

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    result = {
        "bench": "metrics_overhead",
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "per_image_s": {"no_op_observer": base, "prometheus": with_metrics},
        "ratio": with_metrics / base,
        **requests,
    }
    path = args.out / f"metrics_overhead-{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
