"""``vitcache loadtest``: drive a server with Zipf-popular images and report what its clients see.

Images come from a pool (synthetic, or the files of a folder; ``--video-fraction`` of the synthetic ones are
2-second MP4 clips) ranked by popularity: rank ``k``
(0-based) is drawn with probability proportional to ``1 / (k + 1) ** s``. Two modes:

- open loop (``--rate``): requests start on a fixed schedule whatever the server does, like
  k6's constant-arrival-rate; latency counts from the scheduled start, so a stalled server
  shows up in it (no coordinated omission). At most ``--max-in-flight`` are outstanding;
  past that a request is dropped and counted.
- closed loop (``--concurrency``): that many clients each send their next request when the
  previous one is answered, like perf_analyzer.

The run stops at ``--duration`` or ``--max-requests``, whichever comes first. Each request is
a full hash-first exchange through :class:`AsyncVitCacheClient`. The report has throughput,
latency percentiles, the hit ratio by tier (from each image's source), errors by status code,
and the hit ratio an ideal LRU of a given byte size would reach on the same sequence of
images, simulated with the server's own L1 policy and the embeddings' real sizes.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import av
import grpc
import numpy as np
from PIL import Image
from tqdm import tqdm

from vitcache.cache.l1 import L1Cache

from .client import AsyncVitCacheClient, EncodedImage, Video

SOURCES = ("L1", "L2", "COMPUTED")
QUANTILES = (50, 90, 95, 99)
#: Shares of the distinct images' bytes at which the LRU is also simulated (cache sizing curve).
WORKING_SET_FRACTIONS = (0.1, 0.25, 0.5, 1.0)


@dataclass(frozen=True)
class LoadConfig:
    target: str
    mode: Literal["open", "closed"] = "closed"
    rate: float = 50.0  # open loop: requests started per second
    concurrency: int = 4  # closed loop: requests in flight
    duration_s: float = 30.0
    max_requests: int | None = None
    images_per_request: int = 1
    pool_size: int = 1000
    zipf_exponent: float = 1.0
    image_sizes: tuple[tuple[int, int], ...] = ((448, 448),)  # (width, height), drawn uniformly per image
    image_dir: str | None = None
    video_fraction: float = 0.0  # share of synthetic pool items that are clips (MP4, 8 frames at 4 fps)
    seed: int = 0
    max_in_flight: int = 1024
    timeout_s: float = 60.0
    lru_bytes: tuple[int, ...] = ()
    progress: bool = True


class ImagePool:
    """``size`` images by popularity rank; synthetic ones are made on first use and kept (JPEG bytes, or
    a :class:`Video` of MP4 bytes for ``video_fraction`` of them)."""

    def __init__(
        self,
        size: int,
        zipf_exponent: float,
        seed: int,
        image_sizes: Sequence[tuple[int, int]] = ((448, 448),),
        image_dir: str | None = None,
        video_fraction: float = 0.0,
    ) -> None:
        if size < 1:
            raise ValueError("the pool needs at least one image")
        if not 0 <= video_fraction <= 1:
            raise ValueError("the video fraction is a share, from 0 to 1")
        self._seed = seed
        self._video_fraction = video_fraction
        self._sizes = list(image_sizes)
        self._files: list[Path] | None = None
        if image_dir is not None:
            files = sorted(p for p in Path(image_dir).iterdir() if p.is_file())
            if not files:
                raise ValueError(f"no files in {image_dir}")
            np.random.default_rng(seed).shuffle(files)  # popularity must not follow file names
            self._files = files[:size]
            size = len(self._files)
        self.size = size
        weights = 1.0 / np.arange(1, size + 1, dtype=np.float64) ** zipf_exponent
        self.probabilities = weights / weights.sum()
        self._rng = np.random.default_rng([seed, 1])
        self._made: dict[int, bytes | Video] = {}

    def draw(self, count: int) -> list[int]:
        return self._rng.choice(self.size, size=count, p=self.probabilities).tolist()

    def image(self, index: int) -> bytes | Video:
        if self._files is not None:
            return self._files[index].read_bytes()
        if index not in self._made:
            self._made[index] = self._synthesize(index)
        return self._made[index]

    def _synthesize(self, index: int) -> bytes | Video:
        rng = np.random.default_rng([self._seed, 2, index])
        width, height = self._sizes[int(rng.integers(len(self._sizes)))]
        coarse = rng.integers(0, 256, (max(1, height // 16), max(1, width // 16), 3), dtype=np.uint8)
        picture = Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)
        if rng.random() < self._video_fraction:
            return Video(_clip(np.asarray(picture)))
        buf = io.BytesIO()
        picture.save(buf, format="JPEG", quality=90)
        return buf.getvalue()


def _clip(picture: np.ndarray, frames: int = 8, fps: int = 4) -> bytes:
    """An H.264 MP4 of ``picture`` panning sideways (its size cut to even sides, as yuv420p needs)."""
    picture = picture[: picture.shape[0] // 2 * 2 or 2, : picture.shape[1] // 2 * 2 or 2]
    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as file:
        stream = file.add_stream("libx264", rate=fps)
        stream.height, stream.width, stream.pix_fmt = picture.shape[0], picture.shape[1], "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(np.roll(picture, 4 * i, axis=1)), format="rgb24")
            file.mux(stream.encode(frame))
        file.mux(stream.encode())
    return out.getvalue()


@dataclass
class RequestRecord:
    start_s: float  # since the run's start; the scheduled start in open loop
    images: list[int]  # pool indices, in request order
    latency_s: float | None = None
    results: list[EncodedImage] = field(default_factory=list)
    failure: str = ""  # the status code of a failed RPC ("" if it was answered)


def simulate_lru(accesses: Iterable[tuple[bytes, int]], capacity_bytes: int) -> float | None:
    """Hit ratio of an L1 of ``capacity_bytes``, starting empty, over (digest, embedding bytes) accesses.

    Runs :class:`vitcache.cache.l1.L1Cache` itself, so eviction and "too large to store" follow the server.
    """
    cache, hits, total = L1Cache(capacity_bytes), 0, 0
    for digest, nbytes in accesses:
        total += 1
        if cache.get(digest) is not None:
            hits += 1
        else:
            cache.put(digest, _SizeOnly(nbytes))  # type: ignore[arg-type]  # L1Cache reads only .nbytes
    return hits / total if total else None


@dataclass(frozen=True)
class _SizeOnly:
    nbytes: int


class LoadTest:
    """One run against ``config.target``; :meth:`run` returns the records."""

    def __init__(self, config: LoadConfig, pool: ImagePool) -> None:
        self.config = config
        self.pool = pool
        self.records: list[RequestRecord] = []
        self.dropped = 0
        self.elapsed_s = 0.0
        self._bar: tqdm | None = None

    async def run(self, client: AsyncVitCacheClient) -> list[RequestRecord]:
        config = self.config
        total = config.max_requests or (round(config.rate * config.duration_s) if config.mode == "open" else None)
        with tqdm(total=total, unit="req", disable=not config.progress, file=sys.stderr, leave=False) as bar:
            self._bar = bar
            started = time.perf_counter()
            if config.mode == "open":
                await self._open_loop(client)
            else:
                await self._closed_loop(client)
            self.elapsed_s = time.perf_counter() - started
        return self.records

    def _more(self, now_s: float) -> bool:
        limit = self.config.max_requests
        return now_s < self.config.duration_s and (limit is None or len(self.records) + self.dropped < limit)

    def _next(self, start_s: float) -> RequestRecord:
        record = RequestRecord(start_s, self.pool.draw(self.config.images_per_request))
        self.records.append(record)
        return record

    async def _open_loop(self, client: AsyncVitCacheClient) -> None:
        loop = asyncio.get_running_loop()
        t0, interval, issued = loop.time(), 1.0 / self.config.rate, 0
        in_flight: set[asyncio.Task[None]] = set()
        while self._more(issued * interval):
            await asyncio.sleep(max(0.0, t0 + issued * interval - loop.time()))
            if len(in_flight) >= self.config.max_in_flight:
                self.dropped += 1
            else:
                record = self._next(issued * interval)
                task = asyncio.ensure_future(self._send(client, record, t0, from_schedule=True))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            issued += 1
        await asyncio.gather(*in_flight)  # each is bounded by timeout_s

    async def _closed_loop(self, client: AsyncVitCacheClient) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        async def user() -> None:
            while self._more(loop.time() - t0):
                await self._send(client, self._next(loop.time() - t0), t0, from_schedule=False)

        await asyncio.gather(*(user() for _ in range(self.config.concurrency)))

    async def _send(self, client: AsyncVitCacheClient, record: RequestRecord, t0: float, from_schedule: bool) -> None:
        """Latency counts from the scheduled start (open loop) or from the send (closed loop)."""
        images = [self.pool.image(i) for i in record.images]
        if not from_schedule:
            record.start_s = asyncio.get_running_loop().time() - t0
        try:
            record.results = await client.encode(images, timeout=self.config.timeout_s)
        except grpc.aio.AioRpcError as exc:
            record.failure = exc.code().name
        record.latency_s = asyncio.get_running_loop().time() - t0 - record.start_s
        if self._bar is not None:
            self._bar.update(1)


def build_report(test: LoadTest, l1_capacity_bytes: int | None) -> dict[str, Any]:
    records, elapsed = test.records, max(test.elapsed_s, 1e-9)
    answered = [r for r in records if not r.failure]
    latencies = np.array([r.latency_s for r in records if r.latency_s is not None])
    sources: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for record in records:
        if record.failure:
            errors[record.failure] += len(record.images)
        for result in record.results:
            if result.error is not None:
                errors[result.error.code.name] += 1
            else:
                sources[result.source] += 1
    accesses = [(r.digest, _nbytes(r)) for record in records for r in record.results if r.error is None]
    return {
        "config": asdict(test.config),
        "elapsed_s": elapsed,
        "requests": {
            "sent": len(records),
            "answered": len(answered),
            "failed": len(records) - len(answered),
            "dropped": test.dropped,
        },
        "images": {
            "answered": sum(sources.values()),
            **{s: sources[s] for s in SOURCES},
            "errors": sum(errors.values()),
            "videos": sum(r.video is not None for record in records for r in record.results),  # of the answered
        },
        "throughput": {
            "requests_per_s": len(answered) / elapsed,
            "images_per_s": sum(len(r.results) for r in answered) / elapsed,
        },
        "latency_ms": _latency_summary(latencies),
        "hit_ratio": _hit_ratios(sources),
        "errors_by_code": dict(errors.most_common()),
        "lru": _lru_report(accesses, l1_capacity_bytes, test.config.lru_bytes),
        "timeline": _timeline(records),
    }


def _nbytes(result: EncodedImage) -> int:
    return sum(t.numel() * t.element_size() for t in result.embeddings)


def _latency_summary(latencies_s: np.ndarray) -> dict[str, float | None]:
    if not len(latencies_s):
        return {**{f"p{q}": None for q in QUANTILES}, "mean": None, "max": None}
    ms = latencies_s * 1e3
    return {
        **{f"p{q}": float(v) for q, v in zip(QUANTILES, np.percentile(ms, QUANTILES), strict=True)},
        "mean": float(ms.mean()),
        "max": float(ms.max()),
    }


def _hit_ratios(sources: Counter[str]) -> dict[str, float | None]:
    total = sum(sources[s] for s in SOURCES)
    if not total:
        return {"overall": None, "L1": None, "L2": None}
    return {
        "overall": (sources["L1"] + sources["L2"]) / total,
        "L1": sources["L1"] / total,
        "L2": sources["L2"] / total,
    }


def _lru_report(accesses: list[tuple[bytes, int]], l1_capacity: int | None, extra: Iterable[int]) -> dict[str, Any]:
    sizes = dict(accesses)  # digest -> bytes of its embeddings
    unique_bytes = sum(sizes.values())
    capacities: dict[int, str] = {round(unique_bytes * f): f"{f:.0%} of distinct bytes" for f in WORKING_SET_FRACTIONS}
    capacities.update({c: "--lru-bytes" for c in extra})
    if l1_capacity is not None:
        capacities[l1_capacity] = "server L1 (--l1-bytes)"
    return {
        "accesses": len(accesses),
        "distinct_images": len(sizes),
        "distinct_bytes": unique_bytes,
        # Every image's first access misses whatever the size: the ceiling of any cache.
        "infinite_cache_hit_ratio": 1 - len(sizes) / len(accesses) if accesses else None,
        "simulated": [
            {"capacity_bytes": c, "what": what, "hit_ratio": simulate_lru(accesses, c)}
            for c, what in sorted(capacities.items())
        ],
    }


def _timeline(records: list[RequestRecord]) -> list[dict[str, Any]]:
    """Per second of the run (by request start): requests, images by source, hit ratio."""
    seconds: dict[int, Counter[str]] = {}
    for record in records:
        bucket = seconds.setdefault(int(record.start_s), Counter())
        bucket["requests"] += 1
        bucket.update(r.source for r in record.results if r.error is None)
    return [
        {"t": t, "requests": c["requests"], **{s: c[s] for s in SOURCES}, **_hit_ratios(c)}
        for t, c in sorted(seconds.items())
    ]


def write_plots(report: dict[str, Any], latencies_ms: Sequence[float], out_dir: Path) -> list[Path]:
    """latency_cdf.png and hit_ratio.png (matplotlib's Agg canvas; no display needed)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    paths = [out_dir / "latency_cdf.png", out_dir / "hit_ratio.png"]
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    if len(latencies_ms):
        values = np.sort(np.asarray(latencies_ms))
        ax.plot(values, np.arange(1, len(values) + 1) / len(values), color="#2563eb")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
    for q in QUANTILES:
        if (v := report["latency_ms"][f"p{q}"]) is not None:
            ax.axvline(v, color="#9aa5b1", linestyle=":", linewidth=1)
            ax.annotate(f"p{q}", (v, 0.02), rotation=90, fontsize=8, color="#52606d")
    ax.set(xlabel="request latency (ms)", ylabel="fraction of requests", title="Latency CDF", ylim=(0, 1.01))
    ax.grid(alpha=0.3)
    fig.savefig(paths[0], dpi=110)

    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    timeline = report["timeline"]
    t = [p["t"] for p in timeline]
    for key, color in (("overall", "#2563eb"), ("L1", "#0e9f6e"), ("L2", "#f59e0b")):
        values = [np.nan if p[key] is None else p[key] * 100 for p in timeline]
        ax.plot(t, values, label=key, color=color, marker="o", markersize=3)
    ax.set(xlabel="seconds since start", ylabel="hit ratio (%)", title="Hit ratio over time", ylim=(0, 101))
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.savefig(paths[1], dpi=110)
    return paths


def format_report(report: dict[str, Any]) -> str:
    req, img, lat, hits = report["requests"], report["images"], report["latency_ms"], report["hit_ratio"]
    lines = [
        f"{req['sent']} requests in {report['elapsed_s']:.1f} s: {req['answered']} answered, {req['failed']} failed, "
        f"{req['dropped']} dropped",
        f"throughput      {report['throughput']['requests_per_s']:.1f} requests/s, "
        f"{report['throughput']['images_per_s']:.1f} images/s",
        "latency (ms)    " + "  ".join(f"p{q} {_num(lat[f'p{q}'])}" for q in QUANTILES) + f"  max {_num(lat['max'])}",
        f"hit ratio       {_pct(hits['overall'])}  (L1 {_pct(hits['L1'])}, L2 {_pct(hits['L2'])}; "
        f"{img['COMPUTED']} of {img['answered']} images computed; {img['videos']} of them videos)",
        "errors          " + (", ".join(f"{code} {n}" for code, n in report["errors_by_code"].items()) or "none"),
    ]
    lru = report["lru"]
    lines.append(
        f"ideal LRU       same {lru['accesses']} images in order, {lru['distinct_images']} distinct "
        f"({lru['distinct_bytes'] / 2**20:.1f} MiB of embeddings); any cache <= {_pct(lru['infinite_cache_hit_ratio'])}"
    )
    for sim in lru["simulated"]:
        lines.append(f"  {sim['capacity_bytes'] / 2**20:>10.1f} MiB  {_pct(sim['hit_ratio']):>8}  {sim['what']}")
    return "\n".join(lines) + "\n"


def _pct(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio * 100:.1f} %"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    open_loop = args.rate is not None
    for name, value in (("--rate", args.rate), ("--concurrency", args.concurrency), ("--duration", args.duration)):
        if value is not None and value <= 0:
            raise SystemExit(f"{name} must be positive")
    return LoadConfig(
        target=args.target,
        mode="open" if open_loop else "closed",
        rate=args.rate if open_loop else 0.0,
        concurrency=0 if open_loop else (args.concurrency or 4),
        duration_s=args.duration,
        max_requests=args.max_requests,
        images_per_request=args.images_per_request,
        pool_size=args.pool_size,
        zipf_exponent=args.zipf_exponent,
        image_sizes=tuple(args.image_size or [(448, 448)]),
        image_dir=args.image_dir,
        video_fraction=args.video_fraction,
        seed=args.seed,
        max_in_flight=args.max_in_flight,
        timeout_s=args.timeout,
        lru_bytes=tuple(args.lru_bytes),
        progress=not args.no_progress,
    )


async def run_loadtest(config: LoadConfig) -> tuple[dict[str, Any], LoadTest]:
    pool = ImagePool(
        config.pool_size, config.zipf_exponent, config.seed, config.image_sizes, config.image_dir, config.video_fraction
    )
    test = LoadTest(config, pool)
    async with AsyncVitCacheClient(config.target) as client:
        stats = await client.stats(timeout=10)
        await test.run(client)
    return build_report(test, stats.l1_capacity_bytes), test


def main(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    try:
        report, test = asyncio.run(run_loadtest(config))
    except grpc.aio.AioRpcError as exc:
        print(f"cannot reach {config.target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2
    print(format_report(report), end="")
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=2))
        latencies = [r.latency_s * 1e3 for r in test.records if r.latency_s is not None]
        for path in [out / "report.json", *write_plots(report, latencies, out)]:
            print(f"wrote {path}")
    return 0 if report["requests"]["answered"] else 1
