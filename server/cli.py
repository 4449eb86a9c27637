"""The ``vitcache`` command: serve, encode, stats, loadtest.

torch and transformers are imported by the subcommands that use them only (``serve``; ``encode`` and
``loadtest`` through the client's tensors), so ``--help`` and ``stats`` answer at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
import time
import urllib.error
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc

from vitcache.errors import ConfigError

log = logging.getLogger(__name__)

_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def byte_size(text: str) -> int:
    """'2GiB', '512MiB', '1.5G', '1000' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]i?)?b?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (try 512MiB or 2GiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


def image_size(text: str) -> tuple[int, int]:
    """WIDTHxHEIGHT -> (width, height)."""
    width, _, height = text.lower().partition("x")
    try:
        size = (int(width), int(height))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not WIDTHxHEIGHT: {text!r}") from None
    if min(size) < 1:
        raise argparse.ArgumentTypeError(f"image size must be positive: {text!r}")
    return size


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the gRPC server")
    p.add_argument("--model", default="tiny-random", help="HF checkpoint directory, or the built-in tiny-random")
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu, cuda:N, a list such as cuda:0,cuda:1, or cuda / all: one encoder process per GPU, all visible GPUs",
    )
    p.add_argument("--dtype", default=None, help="bfloat16, float16, float32 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument(
        "--acceleration",
        default="auto",
        choices=["auto", "none", "varlen", "compile", "graphs"],
        help="vision forward: transformers' (none), packed varlen attention, varlen + torch.compile, "
        "or compile + CUDA graphs per batch size (Qwen families)",
    )
    p.add_argument(
        "--encoder-process",
        default="auto",
        choices=["auto", "on", "off"],
        help="decode, preprocess and forward in a child process that owns the device (auto: on for cuda)",
    )
    p.add_argument(
        "--encoder-ring-bytes",
        type=byte_size,
        default="512MiB",
        help="shared memory the encoder process returns embeddings through (more travel by pipe when full)",
    )
    p.add_argument(
        "--encoder-restart-backoff-ms",
        type=float,
        default=1000,
        help="wait before a dead encoder process is started again (doubles while starts fail, up to 60 s)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address of /metrics, /api/stats and the dashboard")
    p.add_argument("--metrics-port", type=int, default=9400, help="port of /metrics and the dashboard; 0 picks one")
    p.add_argument("--redis-url", default=None, help="redis://host:port/db for the shared L2; none = L1 only")
    p.add_argument("--redis-ttl", type=int, default=0, help="seconds an L2 entry lives (0 = no expiry)")
    p.add_argument("--redis-timeout-ms", type=float, default=500, help="bound on each Redis call")
    p.add_argument("--redis-cluster", action="store_true", help="--redis-url names one seed node of a Redis Cluster")
    p.add_argument(
        "--fleet-lock-ttl-ms",
        type=float,
        default=10_000,
        help="how long replicas sharing L2 wait for the one computing an image before computing it too (0 = no lock)",
    )
    p.add_argument("--l1-bytes", type=byte_size, default="2GiB", help="in-process cache size")
    p.add_argument("--max-batch-patches", type=int, default=16384, help="patches in one vision forward")
    p.add_argument("--max-batch-wait-ms", type=float, default=2.0, help="how long a batch waits to fill")
    p.add_argument("--max-image-bytes", type=byte_size, default="32MiB", help="largest encoded image accepted")
    p.add_argument("--max-image-pixels", type=int, default=64 << 20, help="largest width*height accepted")
    p.add_argument(
        "--max-decoded-pixels-in-flight",
        type=int,
        default=128 << 20,
        help="width*height of all images being decoded and preprocessed at once (about 16 bytes each); "
        "more wait, a larger image fails with RESOURCE_EXHAUSTED",
    )
    p.add_argument("--max-images-per-request", type=int, default=256)
    p.add_argument("--max-request-bytes", type=byte_size, default="256MiB", help="largest gRPC message accepted")
    p.add_argument("--max-put-bytes", type=byte_size, default="256MiB", help="tensor bytes of one Put entry")
    p.add_argument("--max-video-bytes", type=byte_size, default="128MiB", help="largest encoded video accepted")
    p.add_argument("--max-video-seconds", type=float, default=3600.0, help="longest video accepted (its header)")
    p.add_argument("--max-video-frames", type=int, default=768, help="frames sampled from one video")
    p.add_argument("--max-video-frame-pixels", type=int, default=3840 * 2160, help="width*height of a video frame")
    p.add_argument(
        "--max-cached-video-bytes",
        type=byte_size,
        default="256MiB",
        help="a video entry larger than this is computed and returned, not cached",
    )
    p.add_argument("--preprocess-workers", type=int, default=4, help="threads that decode and preprocess")
    p.add_argument(
        "--shm-socket",
        default=None,
        help="Unix socket for same-host clients that take results in shared memory (its directory: 0700)",
    )
    p.add_argument(
        "--shm-arena-bytes", type=byte_size, default="256MiB", help="shared memory one shm client connection may hold"
    )
    p.add_argument(
        "--max-queued-images",
        type=int,
        default=1024,
        help="misses waiting for preprocessing or the forward; beyond it images fail with RESOURCE_EXHAUSTED",
    )
    p.add_argument(
        "--warmup-image-sizes",
        type=lambda text: tuple(image_size(size) for size in text.split(",")),
        default=(),
        help="WIDTHxHEIGHT,...: at start-up, run batches of 1 to --max-batch-patches of images of these sizes, "
        "so their CUDA graphs (--acceleration graphs) are captured before serving instead of under load",
    )
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve TLS")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", default=None, help="PEM CA: require client certificates it signed (mutual TLS)")
    p.add_argument("--auth-token-file", default=None, help="lines 'TOKEN [TENANT]': require 'authorization: Bearer'")
    p.add_argument(
        "--metrics-token-file",
        default=None,
        help="one token a line: require 'Authorization: Bearer' for /metrics and /api/stats "
        "(unbound --auth-token-file tokens may read them too)",
    )
    p.add_argument("--digest-key-file", default=None, help="secret shared with trusted clients: keyed digests")


def _client_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("encode", help="encode image files through a running server")
    p.add_argument("files", nargs="+")
    p.add_argument("--target", default="localhost:50051", help="host:port; several, comma-separated: a fleet")
    p.add_argument("--tls-ca", default=None, help="PEM CA that signed the server's certificate: connect with TLS")
    p.add_argument("--tls-cert", default=None, help="PEM client certificate, for a server with --tls-client-ca")
    p.add_argument("--tls-key", default=None, help="PEM key of --tls-cert")
    p.add_argument("--auth-token-file", default=None, help="a file holding the bearer token")
    p.add_argument("--tenant", default=None, help="x-vitcache-tenant")
    p.add_argument("--digest-key-file", default=None, help="the server's --digest-key-file")
    p = sub.add_parser("proxy", help="in front of vLLM: encode chat requests' images here, send vLLM their digests")
    p.add_argument("--vllm", required=True, help="the vLLM server's URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--target", default="localhost:50051", help="the vitcache server's host:port")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    p = sub.add_parser("stats", help="print a running server's dashboard numbers (from its metrics port)")
    p.add_argument("--metrics-url", default="http://127.0.0.1:9400", help="the server's --metrics-host/--metrics-port")
    p.add_argument("--window", type=float, default=10.0, help="seconds the rates and percentiles cover")
    p.add_argument("--auth-token-file", default=None, help="a file holding a bearer token the metrics port accepts")
    p = sub.add_parser("loadtest", help="drive a server with Zipf-popular images; report latency and hit ratios")
    p.add_argument("--target", default="localhost:50051")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--rate", type=float, help="open loop: requests started per second")
    mode.add_argument("--concurrency", type=int, help="closed loop: requests in flight (default 4)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds the run lasts at most")
    p.add_argument("--max-requests", type=int, default=None, help="requests the run sends at most")
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--pool-size", type=int, default=1000, help="distinct images")
    p.add_argument("--zipf-exponent", type=float, default=1.0, help="popularity skew s: P(rank k) ~ 1/k^s")
    p.add_argument(
        "--image-size",
        type=image_size,
        action="append",
        help="WIDTHxHEIGHT of synthetic images; repeat for a mix (default 448x448)",
    )
    p.add_argument(
        "--video-fraction", type=float, default=0.0, help="share of synthetic items that are 2 s MP4 clips (0 to 1)"
    )
    p.add_argument("--image-dir", default=None, help="use the files of this folder instead of synthetic images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-in-flight", type=int, default=1024, help="open loop: outstanding requests before dropping")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds one request may take")
    p.add_argument("--lru-bytes", type=byte_size, action="append", default=[], help="also simulate an LRU this big")
    p.add_argument("--output-dir", default=None, help="write report.json, latency_cdf.png and hit_ratio.png here")
    p.add_argument("--no-progress", action="store_true")


def _serve(args: argparse.Namespace) -> int:
    from vitcache.server.app import ServerConfig, serve_forever

    from vitcache.digest import load_digest_key
    from vitcache.encode.decode import DecodeLimits
    from vitcache.encode.video_decode import VideoLimits
    from vitcache.engine import EngineConfig

    config = ServerConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        acceleration=args.acceleration,
        host=args.host,
        port=args.port,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        redis_url=args.redis_url,
        redis_ttl_s=args.redis_ttl or None,
        redis_timeout_s=args.redis_timeout_ms / 1000,
        redis_cluster=args.redis_cluster,
        fleet_lock_ttl_s=args.fleet_lock_ttl_ms / 1000 or None,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        auth_token_file=args.auth_token_file,
        metrics_token_file=args.metrics_token_file,
        l1_bytes=args.l1_bytes,
        max_images_per_request=args.max_images_per_request,
        max_request_bytes=args.max_request_bytes,
        shm_socket=args.shm_socket,
        shm_arena_bytes=args.shm_arena_bytes,
        engine=EngineConfig(
            max_batch_patches=args.max_batch_patches,
            max_batch_wait_s=args.max_batch_wait_ms / 1000,
            preprocess_workers=args.preprocess_workers,
            limits=DecodeLimits(args.max_image_bytes, args.max_image_pixels),
            max_decoded_pixels_in_flight=args.max_decoded_pixels_in_flight,
            max_queued_images=args.max_queued_images,
            max_put_bytes=args.max_put_bytes,
            video_limits=VideoLimits(
                args.max_video_bytes, args.max_video_seconds, args.max_video_frames, args.max_video_frame_pixels
            ),
            max_cached_video_bytes=args.max_cached_video_bytes,
            digest_key=load_digest_key(args.digest_key_file) if args.digest_key_file else None,
        ),
        encoder_process={"auto": None, "on": True, "off": False}[args.encoder_process],
        encoder_ring_bytes=args.encoder_ring_bytes,
        encoder_restart_backoff_s=args.encoder_restart_backoff_ms / 1000,
        warmup_image_sizes=args.warmup_image_sizes,
    )
    asyncio.run(serve_forever(config))
    return 0


def _encode(args: argparse.Namespace) -> int:
    from vitcache.client import ConnectOptions, FleetClient, VitCacheClient

    options = ConnectOptions.from_files(
        args.tls_ca, args.tls_cert, args.tls_key, args.auth_token_file, args.digest_key_file, tenant=args.tenant
    )
    targets = args.target.split(",")
    client = FleetClient(targets, options=options) if len(targets) > 1 else VitCacheClient(targets[0], options=options)
    with client:
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
    from vitcache.server.stats_table import StatsRefused, fetch_stats, format_stats

    # Read here, not through the client's ConnectOptions: importing the client imports torch.
    token = Path(args.auth_token_file).read_text().split()[0] if args.auth_token_file else None
    try:
        stats = fetch_stats(args.metrics_url, args.window, token)
    except StatsRefused as refused:
        print(f"vitcache stats: {refused}", file=sys.stderr)
        return 1
    print(format_stats(stats), end="")
    return 0


def _proxy(args: argparse.Namespace) -> int:
    from vitcache.client import VitCacheClient
    from vitcache.integrations.vllm_proxy import make_proxy

    with VitCacheClient(args.target) as client:
        server = make_proxy(args.vllm, client, args.host, args.port)
        print(f"vitcache proxy on {args.host}:{server.server_address[1]} -> {args.vllm}", flush=True)
        server.serve_forever()
    return 0


def _loadtest(args: argparse.Namespace) -> int:
    from vitcache.client import loadtest

    return loadtest.main(args)


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": _serve,
    "encode": _encode,
    "stats": _stats,
    "loadtest": _loadtest,
    "proxy": _proxy,
}


def _operator_message(exc: Exception, args: argparse.Namespace) -> str | None:
    """What an operator's mistake (a setting, a file, a server that is not there) means, in a line;
    None for anything else, which is a bug and keeps its traceback."""
    if isinstance(exc, ConfigError):
        return str(exc)
    if isinstance(exc, OSError) and exc.filename is not None:  # FileNotFoundError, IsADirectoryError, ...
        return f"{exc.filename}: {exc.strerror}"
    if isinstance(exc, urllib.error.HTTPError):
        return f"{args.metrics_url} answered HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return f"cannot reach {args.metrics_url}: {exc.reason}; is `vitcache serve` running with that metrics port?"
    if isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call):
        hint = "; is `vitcache serve` running there?" if exc.code() == grpc.StatusCode.UNAVAILABLE else ""
        return f"{args.target}: {exc.code().name}: {exc.details()}{hint}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vitcache", description=__doc__)
    parser.add_argument("--log-level", default="INFO", help="debug also shows the traceback of a failed command")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _client_parsers(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _COMMANDS[args.command](args)
    except Exception as exc:
        message = _operator_message(exc, args)
        if message is None:
            raise
        log.debug("vitcache %s failed", args.command, exc_info=True)
        print(f"vitcache {args.command}: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
