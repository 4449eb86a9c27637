"""The ``vitcache`` command: serve, encode, stats, loadtest, proxy.

torch and transformers are imported by the subcommands that use them only (``serve``; ``encode``,
``loadtest`` and ``proxy`` through the client's tensors), so ``--help`` and ``stats`` answer at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
import urllib.error
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from vitcache.config import Setting, VitcacheConfig, byte_size, groups_of, image_size, settings_of, switch
from vitcache.errors import ConfigError

log = logging.getLogger(__name__)


def _flag_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` as an argparse type: its ValueError's message is argparse's error message."""

    def flag_type(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    flag_type.__name__ = parse.__name__
    return flag_type


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    """``serve``'s flags, one per setting of the config tree, in groups along the flow."""
    p = sub.add_parser(
        "serve",
        help="run the gRPC server",
        description="Run the gRPC server. Every flag can be set by its environment variable instead; "
        "a flag beats its variable, which beats the default.",
    )
    for group_name, group in groups_of():
        flags = p.add_argument_group(group_name, group.__doc__)
        for name, meta, library_default in settings_of(group):
            unit = f" {meta.unit}" if meta.unit else ""
            kwargs: dict[str, Any] = {
                "dest": name,
                "default": argparse.SUPPRESS,  # absent: the variable, then the default (serve_config)
                "help": f"{meta.help} [{meta.env_var}; default {meta.default_text(library_default)}{unit}]".replace(
                    "%", "%%"
                ),
            }
            if meta.parse is None:
                kwargs["action"] = "store_true"
            elif meta.choices is not None:
                kwargs["choices"] = list(meta.choices)
            else:
                kwargs["type"] = meta.parse if meta.parse in (int, float) else _flag_type(meta.parse)
            if meta.parse is not None and meta.choices is None:
                kwargs["metavar"] = meta.flag.removeprefix("--").replace("-", "_").upper()
            flags.add_argument(meta.flag, **kwargs)


def serve_config(args: argparse.Namespace, environ: Mapping[str, str]) -> VitcacheConfig:
    """The config tree of ``serve``'s flags, their environment variables and the defaults, in that order."""
    groups = {}
    for group_name, group in groups_of():
        values = {}
        for name, meta, library_default in settings_of(group):
            if name in vars(args):
                values[name] = meta.from_flag(getattr(args, name))
            elif meta.env_var in environ:
                values[name] = _env_value(meta, environ[meta.env_var])
            else:
                values[name] = meta.command_default(library_default)
        groups[group_name] = group(**values)
    return VitcacheConfig(**groups)


def _env_value(meta: Setting, text: str) -> Any:
    """The field's value of an environment variable's ``text``; ConfigError naming the variable if it
    is none (not a value of the flag's kind, or out of its bounds)."""
    try:
        if meta.parse is None:
            value = switch(text)
        elif meta.choices is not None:
            if text not in meta.choices:
                raise ValueError(f"not one of {', '.join(meta.choices)}")
            value = meta.from_flag(text)
        else:
            value = meta.from_flag(meta.parse(text))
    except ValueError as exc:
        reason = {int: "not an integer", float: "not a number"}.get(meta.parse, str(exc))  # type: ignore[call-overload]
        raise ConfigError(f"{meta.env_var}={text!r}: {reason} (as {meta.flag} would take it)") from None
    if problem := meta.problem(value):
        raise ConfigError(f"{meta.env_var}={text!r}: {problem}")
    return value


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
    p = sub.add_parser("proxy", help="in front of vLLM: encode chat requests' images and videos, send vLLM digests")
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
        type=_flag_type(image_size),
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
    p.add_argument(
        "--lru-bytes", type=_flag_type(byte_size), action="append", default=[], help="also simulate an LRU this big"
    )
    p.add_argument("--output-dir", default=None, help="write report.json, latency_cdf.png and hit_ratio.png here")
    p.add_argument("--no-progress", action="store_true")


def _serve(args: argparse.Namespace) -> int:
    from vitcache.server.app import serve_forever

    asyncio.run(serve_forever(serve_config(args, os.environ)))
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitcache", description=__doc__)
    parser.add_argument("--log-level", default="INFO", help="debug also shows the traceback of a failed command")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _client_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
