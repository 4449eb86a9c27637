"""Hit latency: vitcache over gRPC and over shared memory, against a raw gRPC transfer, Redis GET and a memory copy.

    .venv/bin/python bench/hit_path.py        # ~2 min on 2 cores; prints tables, writes bench/results/hit_path-*.json

One 448x448 image of Qwen2.5-VL-7B is 256 tokens x 3584 bf16 = 1.8 MB. A server process holds
16 such entries in L1 (put there directly: a hit never runs the tower) and serves them four
ways: the vitcache gRPC API as served (hit-path codecs on both sides), the same API with
protobuf's own serializer and parser (the path before them), and the shared-memory socket: from the
shared L1 found through its index (the client finds and copies the entry itself, no round trip), from
the shared L1 found by asking the server (a round trip; the client copies out of its read-only mapping,
the server copies nothing), and into the connection's own arena (the server copies, the client's tensors
view the arena).
Beside it, in the same process, a raw gRPC service answers a tiny request with the same number of
bytes (one-way: what a hit moves, and the baseline the ratios divide by). Redis GETs the same bytes from a
redis-server this script starts. Every method runs round-robin in one loop, so a busy machine
slows all of them alike and the ratios hold even where the absolute numbers do not. The
vitcache clients build CPU tensors, as a caller would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from run_info import REPO, commit, utc_stamp

sys.path.append(str(REPO))  # tests.conftest: the redis-server the tests use


TOKENS, HIDDEN = 256, 3584  # Qwen2.5-VL-7B, one 448x448 image
ENTRIES = 16
RAW_SERVICE = "bench.Raw"


def _identity(data: bytes) -> bytes:
    return data


def entry_key(i: int) -> bytes:
    return f"hit-path-bench-{i}".encode()


def make_entry(i: int):  # type: ignore[no-untyped-def]
    import torch

    from vitcache.cache.entry import CachedEmbedding

    generator = torch.Generator().manual_seed(i)
    tensor = torch.randn(TOKENS, HIDDEN, generator=generator).to(torch.bfloat16)
    return CachedEmbedding.from_tensors((1, 32, 32), [tensor])  # 32x32 patches of 14 px, merged 2x2


def serve(shm_socket: str, ready: mp.Queue) -> None:  # type: ignore[type-arg]
    """The server process: vitcache (two serializers, shm) and the raw gRPC baseline on one event loop."""
    import grpc
    from vitcache.server.app import start_server
    from vitcache.server.service import VitCacheServicer, image_result
    from vitcache.v1 import vitcache_pb2_grpc as pb_grpc

    from vitcache.config import VitcacheConfig
    from vitcache.digest import digest_file

    class ProtobufSerializerServicer(VitCacheServicer):
        """Fetch as it was before the hit-path serializer: messages serialized by protobuf."""

        async def Fetch(self, request, context):  # type: ignore[no-untyped-def]
            async for outcome in self.engine.fetch(list(request.digests)):
                yield image_result(outcome)

    async def main() -> None:
        running = await start_server(VitcacheConfig.of(port=0, shm_socket=shm_socket, l1_bytes=1 << 30))
        for i in range(ENTRIES):
            running.engine.l1.put(digest_file(entry_key(i)), make_entry(i))
        payload = b"".join(bytes(make_entry(i).outputs[0].data) for i in range(ENTRIES))
        options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        baseline = grpc.aio.server(options=options)

        async def echo(request: bytes, context: object) -> bytes:
            return request  # the control path's round trip, with a 1-byte request

        async def download(request: bytes, context: object) -> bytes:
            return payload[: int(request)]

        handlers = {
            "Echo": grpc.unary_unary_rpc_method_handler(echo, _identity, _identity),
            "Download": grpc.unary_unary_rpc_method_handler(download, _identity, _identity),
        }
        baseline.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(RAW_SERVICE, handlers),))
        pb_grpc.add_VitCacheServicer_to_server(
            ProtobufSerializerServicer(running.engine, ENTRIES), baseline
        )  # the generated registration
        baseline_port = baseline.add_insecure_port("127.0.0.1:0")
        await baseline.start()
        ready.put((running.port, baseline_port))
        await baseline.wait_for_termination()

    asyncio.run(main())


def percentiles(samples: list[float]) -> tuple[float, float]:
    return float(np.percentile(samples, 50)), float(np.percentile(samples, 99))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default="1,4,16", help="images per request")
    parser.add_argument("--iters", type=int, default=300, help="timed rounds for 1 image; fewer for more images")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args()

    import grpc
    import redis
    import torch
    from vitcache.client import VitCacheClient
    from vitcache.v1 import vitcache_pb2 as pb
    from vitcache.v1 import vitcache_pb2_grpc as pb_grpc

    from tests.conftest import RedisProcess
    from vitcache.digest import digest_file
    from vitcache.wire.tensor_codec import TensorBytes

    workdir = Path(tempfile.mkdtemp(prefix="vitcache-bench-"))
    shm_socket = str(workdir / "shm" / "vitcache.sock")
    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    server = ctx.Process(target=serve, args=(shm_socket, ready), daemon=True)
    server.start()
    redis_server = RedisProcess(workdir / "redis")
    try:
        redis_server.start()
        vitcache_port, baseline_port = ready.get(timeout=120)
        digests = [digest_file(entry_key(i)) for i in range(ENTRIES)]
        absent = [digest_file(b"absent-%d" % i) for i in range(ENTRIES)]
        expected = [make_entry(i) for i in range(ENTRIES)]
        item_bytes = expected[0].nbytes
        store = redis.Redis(host="127.0.0.1", port=redis_server.port)
        for i, entry in enumerate(expected):
            store.set(f"bench:{i}", bytes(entry.outputs[0].data))

        grpc_client = VitCacheClient(f"127.0.0.1:{vitcache_port}")
        shm_client = VitCacheClient(f"127.0.0.1:{vitcache_port}", shm_socket=shm_socket)
        asking_client = VitCacheClient(f"127.0.0.1:{vitcache_port}", shm_socket=shm_socket, shm_shared_index=False)
        own_arena_client = VitCacheClient(f"127.0.0.1:{vitcache_port}", shm_socket=shm_socket, shm_shared_l1=False)
        unlimited = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        channel = grpc.insecure_channel(f"127.0.0.1:{baseline_port}", options=unlimited)
        echo = channel.unary_unary(f"/{RAW_SERVICE}/Echo", _identity, _identity)
        download = channel.unary_unary(f"/{RAW_SERVICE}/Download", _identity, _identity)
        before_stub = pb_grpc.VitCacheStub(channel)  # the generated client: protobuf parses and copies

        def fetch(client: VitCacheClient, count: int) -> list[torch.Tensor]:
            return [r.raise_for_error().embeddings[0] for r in client.fetch(digests[:count])]

        def fetch_before(count: int) -> list[torch.Tensor]:
            results = before_stub.Fetch(pb.FetchRequest(digests=digests[:count]))
            return [TensorBytes(t.dtype, tuple(t.shape), t.data).to_tensor() for r in results for t in r.embeddings]

        def methods_for(count: int) -> dict[str, Callable[[], object]]:
            array = np.frombuffer(os.urandom(count * item_bytes), np.uint8)
            keys = [f"bench:{i}" for i in range(count)]
            return {
                "raw gRPC one-way": lambda: download(str(count * item_bytes).encode()),
                "vitcache gRPC": lambda: fetch(grpc_client, count),
                "vitcache gRPC before (protobuf codecs)": lambda: fetch_before(count),
                "vitcache shm": lambda: fetch(shm_client, count),
                "vitcache shm, no index (asks the server)": lambda: fetch(asking_client, count),
                "vitcache shm, own arena (server copies)": lambda: fetch(own_arena_client, count),
                "vitcache shm, misses (control path only)": lambda: shm_client.fetch(absent[:count]),
                "raw gRPC 1-byte echo (control path only)": lambda: echo(b"x"),
                "redis GET": lambda: store.mget(keys),
                "numpy copy": array.copy,
            }

        rows = []
        for count in (int(n) for n in args.images.split(",")):
            methods = methods_for(count)
            for name in [name for name in methods if name.startswith("vitcache") and "misses" not in name]:
                tensors = methods[name]()
                assert isinstance(tensors, list) and len(tensors) == count, name
                for tensor, entry in zip(tensors, expected, strict=False):
                    assert tensor.view(torch.uint8).numpy().tobytes() == bytes(entry.outputs[0].data), name
            iters = max(40, args.iters // count)
            samples: dict[str, list[float]] = {name: [] for name in methods}
            for round_ in range(iters + 5):
                for name, method in methods.items():
                    start = time.perf_counter()
                    result = method()
                    elapsed = time.perf_counter() - start
                    del result
                    if round_ >= 5:  # warm-up
                        samples[name].append(elapsed)
            one_way_p50 = percentiles(samples["raw gRPC one-way"])[0]
            for name, times in samples.items():
                p50, p99 = percentiles(times)
                rows.append(
                    {
                        "images": count,
                        "method": name,
                        "p50_ms": p50 * 1e3,
                        "p99_ms": p99 * 1e3,
                        "gb_per_s": None if "control path" in name else count * item_bytes / p50 / 1e9,
                        "vs_one_way": p50 / one_way_p50,
                        "rounds": iters,
                    }
                )
        for client in (grpc_client, shm_client, asking_client, own_arena_client):
            client.close()
    finally:
        server.kill()
        redis_server.kill()

    print(f"\nhit path, {item_bytes / 1e6:.2f} MB per image ({TOKENS} x {HIDDEN} bf16), {os.cpu_count()} CPUs")
    print(f"{'images':>6}  {'method':<44}{'p50 ms':>9}{'p99 ms':>9}{'GB/s':>8}{'p50 / one-way':>15}")
    for row in rows:
        print(
            f"{row['images']:>6}  {row['method']:<44}{row['p50_ms']:>9.3f}{row['p99_ms']:>9.3f}"
            f"{'-' if row['gb_per_s'] is None else format(row['gb_per_s'], '.2f'):>8}{row['vs_one_way']:>15.2f}"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    date = utc_stamp()
    path = out / f"hit_path-{date}.json"
    meta = {"commit": commit(), "date": date, "cpus": os.cpu_count(), "machine": platform.platform()}
    path.write_text(json.dumps({**meta, "item_bytes": item_bytes, "rows": rows}, indent=2))
    print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")


if __name__ == "__main__":
    main()
