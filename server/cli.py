"""The ``vitcache`` command: serve, encode, stats."""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
import time
from collections.abc import Sequence

from vitcache.preprocess import DecodeLimits

from vitcache.engine import EngineConfig

_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def byte_size(text: str) -> int:
    """'2GiB', '512MiB', '1.5G', '1000' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]i?)?b?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (try 512MiB or 2GiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the gRPC server")
    p.add_argument("--model", default="tiny-random", help="HF checkpoint directory, or the built-in tiny-random")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=None, help="bfloat16, float16, float32 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    p.add_argument("--redis-url", default=None, help="redis://host:port/db for the shared L2; none = L1 only")
    p.add_argument("--redis-ttl", type=int, default=0, help="seconds an L2 entry lives (0 = no expiry)")
    p.add_argument("--redis-timeout-ms", type=float, default=500, help="bound on each Redis call")
    p.add_argument("--l1-bytes", type=byte_size, default="2GiB", help="in-process cache size")
    p.add_argument("--max-batch-patches", type=int, default=16384, help="patches in one vision forward")
    p.add_argument("--max-batch-wait-ms", type=float, default=2.0, help="how long a batch waits to fill")
    p.add_argument("--max-image-bytes", type=byte_size, default="32MiB", help="largest encoded image accepted")
    p.add_argument("--max-image-pixels", type=int, default=64 << 20, help="largest width*height accepted")
    p.add_argument("--max-images-per-request", type=int, default=256)
    p.add_argument("--max-request-bytes", type=byte_size, default="256MiB", help="largest gRPC message accepted")
    p.add_argument("--preprocess-workers", type=int, default=4, help="threads that decode and preprocess")


def _client_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("encode", help="encode image files through a running server")
    p.add_argument("files", nargs="+")
    p.add_argument("--target", default="localhost:50051")
    p = sub.add_parser("stats", help="print a running server's counters")
    p.add_argument("--target", default="localhost:50051")


def _serve(args: argparse.Namespace) -> None:
    from vitcache.server.app import ServerConfig, serve_forever

    config = ServerConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        host=args.host,
        port=args.port,
        redis_url=args.redis_url,
        redis_ttl_s=args.redis_ttl or None,
        redis_timeout_s=args.redis_timeout_ms / 1000,
        l1_bytes=args.l1_bytes,
        max_images_per_request=args.max_images_per_request,
        max_request_bytes=args.max_request_bytes,
        engine=EngineConfig(
            max_batch_patches=args.max_batch_patches,
            max_batch_wait_s=args.max_batch_wait_ms / 1000,
            preprocess_workers=args.preprocess_workers,
            limits=DecodeLimits(args.max_image_bytes, args.max_image_pixels),
        ),
    )
    asyncio.run(serve_forever(config))


def _encode(args: argparse.Namespace) -> int:
    from vitcache.client import VitCacheClient

    with VitCacheClient(args.target) as client:
        start = time.perf_counter()
        results = client.encode(args.files)
        elapsed_ms = (time.perf_counter() - start) * 1e3
    failed = 0
    for path, result in zip(args.files, results, strict=True):
        if result.error is not None:
            failed += 1
            print(f"{path}: ERROR {result.error.code.name}: {result.error.message}")
            continue
        shapes = ", ".join(f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in result.embeddings)
        print(f"{path}: {result.source:<8} grid={list(result.grid_thw)} {shapes} digest={result.digest.hex()}")
    print(f"{len(results)} images in {elapsed_ms:.1f} ms")
    return 1 if failed else 0


def _stats(args: argparse.Namespace) -> int:
    from google.protobuf import text_format
    from vitcache.client import VitCacheClient

    with VitCacheClient(args.target) as client:
        print(text_format.MessageToString(client.stats()), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vitcache", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _client_parsers(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        _serve(args)
        return 0
    return {"encode": _encode, "stats": _stats}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
