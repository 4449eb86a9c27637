"""Tensor-parallel fan-out with torch.distributed: rank 0 encodes, every rank gets the same embeddings.

    .venv/bin/python examples/tp_fanout.py                      # starts its own server (tiny-random, CPU, L1 only)
    .venv/bin/python examples/tp_fanout.py --target localhost:50051 --shm-socket /run/vitcache/shm.sock

Each rank is a process (torch.multiprocessing spawn) in a gloo group on loopback. Rank 0 sends
the images; the other ranks only fetch by digest (in shared memory with --shm-socket) and move
the tensors to their own device (--device cuda: rank i on cuda:i, never all on cuda:0). Every rank
reports a checksum of what it received, and whether it initialised CUDA; rank 0 prints them (and
--report writes them as JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import xxhash
from vitcache.client.tp import rank_device


def demo_images(count: int) -> list[np.ndarray]:
    """uint8 HWC RGB images of a few sizes (any ImageLike works: paths, file bytes, arrays)."""
    rng = np.random.default_rng(0)
    sizes = [(224, 224), (160, 320), (320, 160), (448, 448)]
    return [rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8) for i in range(count)]


def rank_main(rank: int, world_size: int, store: str, args: argparse.Namespace) -> None:
    from vitcache.client import VitCacheClient
    from vitcache.client.tp import encode_tp

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        with VitCacheClient(args.target, shm_socket=args.shm_socket) as client:
            images = demo_images(args.images) if rank == 0 else None
            results = encode_tp(client, images, src=0, device=rank_device(args.device, rank))
            checksums = []
            for result in results:
                result.raise_for_error()
                digest = xxhash.xxh3_64()
                for tensor in result.embeddings:
                    digest.update(tensor.cpu().contiguous().view(torch.uint8).numpy())
                checksums.append(digest.hexdigest())
            report = {
                "rank": rank,
                "pid": os.getpid(),
                "digests": [r.digest.hex() for r in results],
                "checksums": checksums,
                "sources": [r.source for r in results],
                "cuda_initialized": torch.cuda.is_initialized(),
            }
            reports: list[dict | None] = [None] * world_size
            dist.all_gather_object(reports, report)
        if rank == 0:
            for r in reports:
                assert r is not None
                print(f"rank {r['rank']}: {' '.join(r['checksums'])}  {r['sources']}  cuda={r['cuda_initialized']}")
            identical = all(r is not None and r["checksums"] == report["checksums"] for r in reports)
            print("identical embeddings on every rank" if identical else "RANKS DIFFER")
            if args.report:
                Path(args.report).write_text(json.dumps(reports, indent=2))
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", help="a running server; none: start one here")
    parser.add_argument("--shm-socket", help="the server's --shm-socket (same host)")
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument(
        "--device", default=None, help="where each rank puts its tensors: cpu (default), or cuda (rank i: cuda:i)"
    )
    parser.add_argument("--report", help="write every rank's report here (JSON)")
    args = parser.parse_args()
    try:
        rank_device(args.device, 0)
    except (ValueError, RuntimeError) as bad:
        parser.error(f"--device: {bad}")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the ranks talk over loopback only
    with tempfile.TemporaryDirectory(prefix="vitcache-tp-") as workdir:
        server = None
        if args.target is None:
            from vitcache.server.background import BackgroundServer

            from vitcache.config import VitcacheConfig

            args.shm_socket = os.path.join(workdir, "shm", "vitcache.sock")
            server = BackgroundServer(VitcacheConfig.of(port=0, shm_socket=args.shm_socket))
            args.target = server.target
        try:
            store = os.path.join(workdir, "gloo-store")
            mp.spawn(rank_main, args=(args.world_size, store, args), nprocs=args.world_size, join=True)
        finally:
            if server is not None:
                server.stop()


if __name__ == "__main__":
    main()
