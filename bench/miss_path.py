"""Miss-path throughput on a GPU: transformers' forward vs vitcache's encoder vs the service end to end.

    python bench/miss_path.py --device cuda            # ~10 min on an H200; writes bench/results/miss_path-*.json
    python bench/miss_path.py --print bench/results/miss_path-h200-*.json   # the tables of saved results
    python bench/miss_path.py --parts overheads        # the device's work per batch besides the forward

Uses the Qwen2.5-VL-7B vision config (676.5M parameters) with random weights in bf16. Every
number in a table is measured in this process (or its child processes) in the same run, so
the ratios hold even on a noisy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from run_info import REPO, children, commit, cpu_seconds, free_port, is_frontend, jpeg, wait_until_serving

QWEN25_7B_VISION = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "out_hidden_size": 3584,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "hidden_act": "silu",
    "in_chans": 3,
    "tokens_per_second": 2,
}


def build_checkpoint(path: Path) -> Path:
    """A Qwen2.5-VL checkpoint with the 7B vision tower and a toy LLM (random weights)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    config = Qwen2_5_VLConfig(
        vision_config=QWEN25_7B_VISION,
        text_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 1024,
        },
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=1344 * 1344).save_pretrained(path)
    return path


def flops_per_image(n_params: int, grid: tuple[int, int, int], config: dict) -> float:
    """2 x parameters x patches, plus attention (4 x seq^2 x hidden per segment per layer)."""
    t, h, w = grid
    patches = t * h * w
    window = (config["window_size"] // config["patch_size"]) ** 2
    full_layers = len(config["fullatt_block_indexes"])
    attn = (
        4
        * config["hidden_size"]
        * (full_layers * patches**2 + (config["depth"] - full_layers) * patches * min(window, patches))
    )
    return 2 * n_params * patches + attn


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, iters: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    fn()
    _synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _synchronize()
    return (time.perf_counter() - start) / iters


def launch_ms(encoder, values: torch.Tensor, grid: torch.Tensor) -> float:  # type: ignore[no-untyped-def]
    """CPU time to queue one forward (the call returns before the device finishes)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    encoder.forward(values, grid)
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed * 1e3


def bench_forward(
    ckpt: Path, device: str, quick: bool, accelerations: tuple[str, ...] = ("varlen", "compile", "graphs")
) -> tuple[list[dict], dict]:
    """transformers' forward (the reference) against each of ``accelerations``: speed and error."""
    from vitcache.config import ModelConfig
    from vitcache.models.loading import load_encoder
    from vitcache.models.preprocess import preprocess

    reference = load_encoder(ModelConfig(str(ckpt), device, acceleration="none"))
    encoders = [("transformers", reference)]
    encoders += [(name, load_encoder(ModelConfig(str(ckpt), device, acceleration=name))) for name in accelerations]
    n_params = sum(p.numel() for p in reference.module.parameters())
    rows, checks = [], {}
    for label, count, side in (("448x448", 32, 448), ("1344x1344", 4, 1344)):
        rng = np.random.default_rng(side)
        pixels = [
            preprocess(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), reference.preprocess_config, device)
            for _ in range(count)
        ]
        values = torch.cat([p for p, _ in pixels]).to(torch.bfloat16)
        grid = torch.tensor([g for _, g in pixels])
        flops = count * flops_per_image(n_params, pixels[0][1], QWEN25_7B_VISION)
        want = reference.forward(values, grid)
        row = {"workload": f"{count} images {label}", "tflop_per_image": flops / count / 1e12}
        for name, encoder in encoders:
            got = encoder.forward(values, grid)
            err = max(
                float((g[0].float() - w[0].float()).abs().max() / w[0].float().abs().max())
                for g, w in zip(got, want, strict=True)
            )
            seconds = timed(lambda e=encoder, v=values, g=grid: e.encode(v, g), 3 if quick else 10)
            row[f"{name}_img_s"] = count / seconds
            row[f"{name}_tflop_s"] = flops / seconds / 1e12
            row[f"{name}_launch_ms"] = launch_ms(encoder, values, grid)
            checks[f"{label}:{name}:max_rel_err"] = err
        rows.append(row)
    return rows, checks


def bench_preprocess(device: str, quick: bool) -> dict:
    from vitcache.encode.decode import DecodeLimits, decode_image, decode_image_on, decode_images_on
    from vitcache.models.preprocess import preprocess
    from vitcache.models.qwen2_vl import Qwen2VLPreprocessConfig

    config = Qwen2VLPreprocessConfig(
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
        min_pixels=56 * 56,
        max_pixels=1344 * 1344,
        image_mean=(0.48145466, 0.4578275, 0.40821073),
        image_std=(0.26862954, 0.26130258, 0.27577711),
        rescale_factor=1 / 255,
    )
    files = [jpeg(768, 1024, i) for i in range(32)]
    limits = DecodeLimits()

    def cpu() -> None:
        for data in files:
            preprocess(decode_image(data, limits), config, "cpu")

    def gpu() -> None:
        for data in files:
            preprocess(decode_image_on(data, limits, device), config, device)

    def gpu_batched() -> None:
        for pixels in decode_images_on(files, limits, device):
            preprocess(pixels, config, device)

    cpu_s = timed(cpu, 2 if quick else 5)
    gpu_s = timed(gpu, 5 if quick else 20)
    batched_s = timed(gpu_batched, 5 if quick else 20)
    a = preprocess(decode_image(files[0], limits), config, "cpu")[0]
    b = preprocess(decode_image_on(files[0], limits, device), config, device)[0].cpu()
    return {
        "workload": "decode + preprocess 32 JPEG 1024x768",
        "cpu_pil_ms": cpu_s * 1e3,
        "gpu_nvjpeg_one_by_one_ms": gpu_s * 1e3,
        "gpu_nvjpeg_batched_ms": batched_s * 1e3,
        "speedup_batched_vs_cpu": cpu_s / batched_s,
        "max_abs_diff_vs_cpu": float((a - b).abs().max()),
    }


def _client(target: str, seed: int, side: int, hash_first: bool, start, queue: mp.Queue) -> None:  # type: ignore[no-untyped-def]
    """One closed-loop client: a request of 1-4 new images at a time. Hash-first is done as its two
    calls (a digest lookup, then the bytes of the misses) so that each is timed on its own.
    Starts when ``start`` (an Event) is set, with every other client; runs until its ``deadline``."""
    from vitcache.client import VitCacheClient

    from vitcache.digest import digest_file

    rng = np.random.default_rng(seed)
    base = jpeg(side, side, seed)
    images = failed = 0
    lookup_s, encode_s = [], []
    with VitCacheClient(target) as client:
        queue.put("ready")
        start.wait()
        deadline = start.deadline.value
        cpu_began = time.process_time()
        while time.time() < deadline:
            count = int(rng.integers(1, 5))
            # Unique bytes per image (all misses): vary the JPEG comment segment.
            batch = [base[:2] + b"\xff\xfe\x00\x10" + rng.bytes(14) + base[2:] for _ in range(count)]
            looked_up = time.perf_counter()
            if hash_first:
                found = client.fetch([digest_file(data) for data in batch], timeout=120)
                assert not any(r.ok for r in found), "images meant to be new were cached"
                lookup_s.append(time.perf_counter() - looked_up)
            sent = time.perf_counter()
            results = client.encode(batch, timeout=120, hash_first=False)
            encode_s.append(time.perf_counter() - sent)
            images += sum(r.ok for r in results)
            failed += sum(not r.ok for r in results)
    queue.put((images, failed, lookup_s, encode_s, time.process_time() - cpu_began))


class _Start:
    """An Event that also carries the deadline the clients run to."""

    def __init__(self, ctx) -> None:  # type: ignore[no-untyped-def]
        self.event = ctx.Event()
        self.deadline = ctx.Value("d", 0.0)

    def wait(self) -> None:
        self.event.wait()


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs so far."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(values) - values[3] - values[4], sum(values)


def _run_clients(
    target: str, side: int, clients: int, seconds: float, hash_first: bool, seed: int, server_pid: int, metrics: str
) -> tuple[list[tuple], float, dict[str, float], dict]:
    """Runs ``clients`` client processes together for ``seconds`` (not counting their start-up).
    Also returns the cores each side used meanwhile (a server whose threads look idle to a Python
    profiler can still burn cores in native thread pools: it did, README, GPU miss path) and the
    server's own view of those seconds (``/api/stats`` at ``metrics``)."""
    from vitcache.server.stats_table import fetch_stats

    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    start = _Start(ctx)
    procs = [
        ctx.Process(target=_client, args=(target, seed + i, side, hash_first, start, queue)) for i in range(clients)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        assert queue.get(timeout=300) == "ready"
    descendants = children(server_pid)
    frontends = [pid for pid in descendants if is_frontend(pid)]
    cpu_before = [cpu_seconds(pid) for pid in (server_pid, *descendants)]
    machine_before = _machine_busy()
    fetch_stats(metrics, 1)  # the snapshot the view of the run starts from
    began = time.time()
    start.deadline.value = began + seconds
    start.event.set()
    totals = [queue.get(timeout=seconds + 300) for _ in procs]
    elapsed = time.time() - began
    view = fetch_stats(metrics, elapsed)
    cpu_after = [cpu_seconds(pid) for pid in (server_pid, *descendants)]
    machine_after = _machine_busy()
    for p in procs:
        p.join()
    used = [after - before for before, after in zip(cpu_before, cpu_after, strict=True)]
    cores = {
        "server": used[0] / elapsed,
        "server_children": sum(used[1:]) / elapsed,
        "frontends": sum(u for pid, u in zip(descendants, used[1:], strict=True) if pid in frontends) / elapsed,
        "clients": sum(t[4] for t in totals) / elapsed,
        "machine_busy_fraction": (machine_after[0] - machine_before[0]) / (machine_after[1] - machine_before[1]),
    }
    return totals, elapsed, cores, view


def _profile_server(pid: int, side: int, seconds: float) -> list[subprocess.Popen]:
    """With VITCACHE_BENCH_PYSPY=DIR: py-spy samples every thread of the server (and of its encoder
    process) during one load test, into DIR as collapsed stacks per thread: every sample, idle or
    not (pyspy-SIDE-all.txt), and only the threads holding the GIL (pyspy-SIDE-gil.txt)."""
    folder = os.environ.get("VITCACHE_BENCH_PYSPY")
    if not folder:
        return []
    command = ["py-spy", "record", "--pid", str(pid), "--subprocesses", "--threads", "--nonblocking"]
    command += ["--format", "raw", "--duration", str(max(1, int(seconds / 2)))]
    return [
        subprocess.Popen([*command, *flags, "-o", f"{folder}/pyspy-{side}-{name}.txt"], stdout=subprocess.DEVNULL)
        for name, flags in (("all", ["--idle"]), ("gil", ["--gil"]))
    ]


def bench_service(
    ckpt: Path,
    device: str,
    side: int,
    clients: int,
    seconds: float,
    extra: list[str],
    log: Path,
    hash_first: bool = True,
    warmup_seconds: float = 10.0,
    kill_encoder_at_s: float | None = None,
) -> dict:
    """One server on ``device`` under ``clients`` closed-loop clients. With ``kill_encoder_at_s``, its
    first encoder process is killed that long into the timed run (the pool's failover under load)."""
    port, metrics_port = free_port(), free_port()
    command = [sys.executable, "-m", "vitcache.server.cli", "--log-level", "WARNING", "serve", "--model", str(ckpt)]
    command += ["--device", device, "--port", str(port), "--metrics-port", str(metrics_port), "--l1-bytes", "512MiB"]
    command += extra
    server = subprocess.Popen(
        command,
        cwd=tempfile.gettempdir(),  # not the repo root, whose folders would shadow the installed package
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    target = f"127.0.0.1:{port}"
    try:
        from vitcache.client import VitCacheClient

        wait_until_serving(target, server, f"see {log}")
        # Warm up under the same load (compilation, CUDA graphs of each batch size) before timing.
        metrics = f"http://127.0.0.1:{metrics_port}"
        _run_clients(target, side, clients, warmup_seconds, hash_first, 0, server.pid, metrics)
        with VitCacheClient(target) as client:
            before = client.stats()
        profilers = _profile_server(server.pid, side, seconds)
        killer, killed = None, {}
        if kill_encoder_at_s is not None:
            encoders = [pid for pid in children(server.pid) if b"spawn_main" in _cmdline(pid) and not is_frontend(pid)]
            killer = threading.Thread(
                target=_kill_under_load,
                args=(target, min(encoders), before.images_computed, kill_encoder_at_s, seconds, killed),
                daemon=True,
            )
            killer.start()
        totals, elapsed, cores, server_view = _run_clients(
            target, side, clients, seconds, hash_first, 1000, server.pid, metrics
        )
        for profiler in profilers:
            profiler.wait(60)
        if killer is not None:
            killer.join()
        with VitCacheClient(target) as client:
            after = client.stats()
        images = sum(t[0] for t in totals)
        lookups, encodes = [s for t in totals for s in t[2]], [s for t in totals for s in t[3]]
        return {
            "images": images,
            "failed": sum(t[1] for t in totals),
            "requests": len(encodes),
            "hash_first": hash_first,
            "client_ms": {
                name: {f"p{q}": float(np.percentile(values, q)) * 1e3 for q in (50, 90, 99)} if values else None
                for name, values in (("lookup", lookups), ("encode", encodes))
            },
            "seconds": elapsed,
            "img_s": images / elapsed,
            "batches": after.batches - before.batches,
            "images_computed": after.images_computed - before.images_computed,
            **killed,
            "server_stages_ms": server_view.get("latency_ms"),
            "server_batch": server_view.get("batch"),
            "gpu_busy_fraction": (server_view.get("gpu") or {}).get("busy_fraction"),
            "cpu_cores": cores,
            "encoders": [
                {
                    "device": a.device,
                    "images": a.images - b.images,
                    "busy_fraction": (a.device_seconds - b.device_seconds) / elapsed,
                    "restarts": a.restarts,
                }
                for a, b in zip(after.encoders, before.encoders, strict=True)
            ],
        }
    finally:
        server.terminate()
        server.wait(timeout=60)


def _kill_under_load(
    target: str, pid: int, computed_before: int, after_s: float, run_seconds: float, killed: dict
) -> None:
    """SIGKILLs encoder ``pid`` ``after_s`` seconds after the timed run's first computed image (client
    processes take seconds to start, so a timer from the start could fire before any load), and records
    when, and how many images the server had computed by then."""
    from vitcache.client import VitCacheClient

    with VitCacheClient(target) as client:
        deadline = time.monotonic() + run_seconds
        while client.stats().images_computed == computed_before and time.monotonic() < deadline:
            time.sleep(0.1)
        loaded_at = time.monotonic()
        time.sleep(after_s)
        os.kill(pid, signal.SIGKILL)
        killed["encoder_killed_after_load_s"] = time.monotonic() - loaded_at
        killed["images_computed_before_kill"] = client.stats().images_computed - computed_before


def bench_encoder_batches(encoder, side: int, batch_images: int, iters: int = 10) -> float:  # type: ignore[no-untyped-def]
    """img/s of the encoder alone, called in process on batches of ``batch_images`` images."""
    from vitcache.models.preprocess import preprocess

    rng = np.random.default_rng(side)
    pixels = [
        preprocess(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), encoder.preprocess_config, encoder.device)
        for _ in range(batch_images)
    ]
    values = torch.cat([p for p, _ in pixels])
    grid = torch.tensor([g for _, g in pixels])
    return batch_images / timed(lambda: encoder.forward(values, grid), iters)


def bench_device_overheads(
    ckpt: Path, device: str, side: int, batch_images: int, acceleration: str = "graphs", iters: int = 20
) -> dict:
    """The encoder alone on batches of ``batch_images`` JPEGs, then with what the service's device
    also does per batch added one at a time: the copies of the outputs to pinned host memory (the
    batcher's), then the decoding and preprocessing of the next batch's JPEGs on a side stream
    (the preprocessing threads'). Tells apart why a service whose GPU is busy all the time still
    runs below its encoder alone."""
    from vitcache.config import ModelConfig
    from vitcache.encode.decode import DecodeLimits, decode_images_on
    from vitcache.encode.split import copy_to_host
    from vitcache.models import accel
    from vitcache.models.loading import load_encoder
    from vitcache.models.preprocess import preprocess

    warmup = ((side, side),) if acceleration == "graphs" else ()
    encoder = load_encoder(ModelConfig(str(ckpt), device, acceleration=acceleration, warmup_image_sizes=warmup), 32768)
    files, limits = [jpeg(side, side, seed) for seed in range(batch_images)], DecodeLimits()

    def prepare() -> list[tuple[torch.Tensor, tuple[int, int, int]]]:
        with accel.side_stream(encoder.device):
            decoded = decode_images_on(files, limits, encoder.device)
            return [preprocess(pixels, encoder.preprocess_config, encoder.device) for pixels in decoded]

    prepared = prepare()
    values, grid = torch.cat([p for p, _ in prepared]), torch.tensor([g for _, g in prepared])
    tokens = [encoder.tokens_for(g) for _, g in prepared]
    steps = {
        "forward": lambda: encoder.forward_packed(values, grid),
        "forward_d2h": lambda: copy_to_host(encoder.forward_packed(values, grid), tokens),
        "forward_d2h_prepare": lambda: (copy_to_host(encoder.forward_packed(values, grid), tokens), prepare()),
    }
    result: dict = {"side": side, "batch_images": batch_images}
    for name, step in steps.items():
        result[f"{name}_img_s"] = batch_images / timed(step, iters)
    return result


def bench_engine(
    ckpt: Path,
    device: str,
    side: int,
    images: int,
    acceleration: str,
    batch_patches: int,
    workers: int = 4,
    bare_batch_images: tuple[int, ...] = (),
) -> dict:
    """The service's own engine, in process, over the same kind of requests (no gRPC); and its
    encoder alone on batches of ``bare_batch_images`` images."""
    from vitcache.server.metrics import ServerMetrics
    from vitcache.server.stats_view import StatsView

    from vitcache.cache.l1 import L1Cache
    from vitcache.config import BatchingConfig, ModelConfig
    from vitcache.encode.pipeline import PipelineConfig
    from vitcache.engine import EmbeddingEngine, EncodedFile, EngineConfig
    from vitcache.models.loading import load_encoder

    model = ModelConfig(str(ckpt), device, acceleration=acceleration, warmup_image_sizes=((side, side),))
    encoder = load_encoder(model, graph_max_patches=batch_patches)
    bare = {n: bench_encoder_batches(encoder, side, n) for n in sorted(set(bare_batch_images))}
    base = jpeg(side, side, 0)
    rng = np.random.default_rng(0)

    metrics = ServerMetrics()
    view = StatsView(metrics.registry)

    async def run() -> float:
        engine = EmbeddingEngine(
            encoder,
            L1Cache(512 << 20),
            config=EngineConfig(
                PipelineConfig(BatchingConfig(max_batch_patches=batch_patches, preprocess_workers=workers))
            ),
            observer=metrics,
        )
        await engine.start()

        async def request(n: int) -> None:
            inputs = [EncodedFile(base[:2] + b"\xff\xfe\x00\x10" + rng.bytes(14) + base[2:]) for _ in range(n)]
            async for outcome in engine.encode(inputs):
                assert outcome.error is None, outcome.error

        sem = asyncio.Semaphore(16)

        async def bounded(n: int) -> None:
            async with sem:
                await request(n)

        # Warm up under the same mix (compilation, CUDA graphs of the batch sizes it makes).
        await asyncio.gather(*(bounded(int(n)) for n in rng.integers(1, 5, images // 2)))
        start = time.perf_counter()
        sizes = [int(s) for s in rng.integers(1, 5, images // 2)]

        if os.environ.get("VITCACHE_BENCH_PROFILE"):
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                await asyncio.gather(*(bounded(n) for n in sizes))
            print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25), flush=True)
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12), flush=True)
        else:
            await asyncio.gather(*(bounded(n) for n in sizes))
        elapsed = time.perf_counter() - start
        await engine.stop()
        return sum(sizes) / elapsed

    img_s = asyncio.run(run())
    stats = view.stats(600)
    return {
        "img_s": img_s,
        "stages_ms": stats.get("latency_ms"),
        "batch": stats.get("batch"),
        "encoder_alone_img_s": bare,
    }


def tables(result: dict) -> str:
    """The result as the README's tables: forward speeds side by side, then the service end to end
    beside its encoder alone on batches as large as the service's and the in-process engine."""
    lines = [f"{result['device']}, commit {result['commit']}, {result['date']}"]
    for row in result.get("forward", []):
        names = [k.removesuffix("_img_s") for k in row if k.endswith("_img_s")]
        speeds = ", ".join(f"{n} {row[n + '_img_s']:.1f} img/s ({row[n + '_tflop_s']:.0f} TFLOP/s)" for n in names)
        best = max(names, key=lambda n: row[n + "_img_s"])
        lines.append(
            f"forward {row['workload']}: {speeds}; {best} {row[best + '_img_s'] / row['transformers_img_s']:.1f}x"
        )
    if "preprocess" in result:
        pre = result["preprocess"]
        lines.append(
            f"{pre['workload']}: CPU {pre['cpu_pil_ms']:.1f} ms, GPU batched {pre['gpu_nvjpeg_batched_ms']:.1f} ms"
        )
    for row in result.get("device_overheads", []):
        base = row["forward_img_s"]
        lines.append(
            f"device per batch of {row['batch_images']} {row['side']}x{row['side']} JPEGs: forward {base:.1f} img/s; "
            f"+ copies to host {row['forward_d2h_img_s']:.1f} ({row['forward_d2h_img_s'] / base:.2f}); "
            f"+ decode and preprocessing alongside {row['forward_d2h_prepare_img_s']:.1f} "
            f"({row['forward_d2h_prepare_img_s'] / base:.2f})"
        )
    for size, runs in result.get("service", {}).items():
        for mode, run in runs.items():
            lines.append(
                f"service {size} (encoder process {mode}): {run['img_s']:.1f} img/s end to end, "
                f"{run['server_batch']['images_mean']:.1f} images per forward; encoder alone on "
                f"{run['encoder_alone_batch_images']}-image batches {run['encoder_alone_img_s']:.1f} img/s "
                f"(ratio {run['e2e_over_encoder_alone']:.2f}); "
                f"in-process engine {run['engine_in_process_img_s']:.1f} img/s"
            )
            if "cpu_cores" in run:
                cores = run["cpu_cores"]
                lines.append(
                    f"  cores used: server {cores['server']:.2f}, its children (encoder process) "
                    f"{cores['server_children']:.2f}, clients {cores['clients']:.2f}; "
                    f"machine {cores['machine_busy_fraction']:.0%} busy"
                )
            if run.get("gpu_busy_fraction") is not None:
                lines.append(f"  GPU running forwards {run['gpu_busy_fraction']:.0%} of the time")
    for row in result.get("scaling", []):
        one = next((r for r in result["scaling"] if r["side"] == row["side"] and r["gpus"] == 1), None)
        killed = (
            f", one encoder killed {row['encoder_killed_after_load_s']:.1f} s into the load, "
            f"{row['images_computed_before_kill']} images in"
            if "encoder_killed_after_load_s" in row
            else ""
        )
        busy = ", ".join(f"{e['device']} {e['busy_fraction']:.0%}" for e in row.get("encoders", []))
        lines.append(
            f"scaling {row['side']}x{row['side']} on {row['gpus']} GPU(s) ({row['devices']}{killed}), "
            f"{row.get('frontends', 0)} front-ends: "
            f"{row['img_s']:.1f} img/s "
            f"({row['img_s'] / one['img_s'] if one else float('nan'):.2f}x one GPU), failed {row['failed']}; "
            f"engine process {row['cpu_cores']['server']:.2f} cores, front-ends "
            f"{row['cpu_cores'].get('frontends', 0):.2f}, encoders "
            f"{row['cpu_cores']['server_children'] - row['cpu_cores'].get('frontends', 0):.2f}; busy: {busy}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--acceleration", default="graphs")
    parser.add_argument("--warmup-seconds", type=float, default=20, help="load before the timed run of each service")
    parser.add_argument("--max-batch-patches", type=int, default=32768)
    parser.add_argument("--switch-interval", type=float, default=None, help="sys.setswitchinterval for this process")
    parser.add_argument("--preprocess-workers", type=int, default=4)
    parser.add_argument("--parts", default="forward,preprocess,service")
    parser.add_argument("--print", nargs="+", metavar="JSON", help="only print the tables of saved results")
    parser.add_argument("--forward-accelerations", default="varlen,compile,graphs", help="compared with transformers'")
    parser.add_argument("--sides", default="448,1344", help="image sides of the service runs")
    parser.add_argument("--single-trip", action="store_true", help="clients send image bytes without a lookup first")
    parser.add_argument(
        "--encoder-process", default="on", help="server's --encoder-process values to compare, e.g. on,off"
    )
    parser.add_argument(
        "--scaling-devices",
        default="cuda:0;cuda:0,cuda:1",
        help="--parts scaling: the server's --device values to compare, ';'-separated, each with @N to give its "
        "--frontends (else each --scaling-frontends value); clients scale with the count",
    )
    parser.add_argument(
        "--scaling-frontends",
        default="0",
        help="--parts scaling: the server's --frontends values to compare with each --scaling-devices, ';'-separated",
    )
    parser.add_argument(
        "--kill-encoder-at",
        type=float,
        default=None,
        help="--parts scaling: also run each multi-GPU server again, killing one encoder this many seconds after "
        "its timed load begins",
    )
    parser.add_argument("--kill-only", action="store_true", help="--parts scaling: only the --kill-encoder-at run")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args()
    if args.print:
        print("\n\n".join(tables(json.loads(Path(file).read_text())) for file in args.print))
        return
    parts = set(args.parts.split(","))
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    ckpt = build_checkpoint(Path(tempfile.mkdtemp()) / "qwen2_5_vl_7b_vision")
    result: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "commit": commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": "Qwen2.5-VL-7B vision config, random weights, bf16",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts_name = "-".join(sorted(parts))
    path = out / f"miss_path-{result['date'][:10]}-{result['commit'][:8]}-{parts_name}.json"

    def save() -> None:  # after every part, so a later failure keeps what was measured
        path.write_text(json.dumps(result, indent=2))

    if "forward" in parts:
        accelerations = tuple(args.forward_accelerations.split(","))
        result["forward"], result["forward_checks"] = bench_forward(ckpt, args.device, args.quick, accelerations)
        for row in result["forward"]:
            print(json.dumps(row), flush=True)
        print(json.dumps(result["forward_checks"]), flush=True)
        save()
    if "preprocess" in parts:
        result["preprocess"] = bench_preprocess(args.device, args.quick)
        print(json.dumps(result["preprocess"]), flush=True)
        save()
    if "overheads" in parts:  # the device's work per batch besides the forward, one part at a time
        result["device_overheads"] = [
            bench_device_overheads(ckpt, args.device, side, batch_images, args.acceleration)
            for side, batch_images in ((448, 8), (1344, 3))
        ]
        for row in result["device_overheads"]:
            print(json.dumps(row), flush=True)
        save()
    if "engine" in parts:  # the in-process engine alone, for tuning
        for side in (448,):
            result[f"engine_{side}"] = bench_engine(
                ckpt, args.device, side, 256, args.acceleration, args.max_batch_patches, args.preprocess_workers
            )
            print(side, json.dumps(result[f"engine_{side}"]), flush=True)
    if "service" in parts:
        accel = ["--acceleration", args.acceleration, "--max-batch-patches", str(args.max_batch_patches)]
        result["service"] = {}
        for side in [int(v) for v in args.sides.split(",")]:
            runs = {}
            for mode in args.encoder_process.split(","):
                extra = [*accel, "--encoder-process", mode, "--warmup-image-sizes", f"{side}x{side}"]
                runs[mode] = bench_service(
                    ckpt,
                    args.device,
                    side,
                    args.clients,
                    args.seconds,
                    extra,
                    out / "server.log",
                    not args.single_trip,
                    args.warmup_seconds,
                )
                print(side, mode, json.dumps(runs[mode]), flush=True)
            # In process: the engine over the same kind of requests, and the encoder alone on
            # batches as large as the service's were (its rate at the service's own batches).
            sizes = tuple(max(1, round(run["server_batch"]["images_mean"])) for run in runs.values())
            engine = bench_engine(
                ckpt,
                args.device,
                side,
                256 if side == 448 else 48,
                args.acceleration,
                args.max_batch_patches,
                bare_batch_images=sizes,
            )
            for run, size in zip(runs.values(), sizes, strict=True):
                run["encoder_alone_batch_images"] = size
                run["encoder_alone_img_s"] = engine["encoder_alone_img_s"][size]
                run["e2e_over_encoder_alone"] = run["img_s"] / run["encoder_alone_img_s"]
                run["engine_in_process_img_s"] = engine["img_s"]
                run["engine_in_process_stages_ms"] = engine["stages_ms"]
                run["engine_in_process_batch"] = engine["batch"]
                run["e2e_over_engine_in_process"] = run["img_s"] / engine["img_s"]
            result["service"][f"{side}x{side}"] = runs
            print(
                side, json.dumps({mode: {k: v for k, v in run.items() if "ms" not in k} for mode, run in runs.items()})
            )
            save()
    if "scaling" in parts:  # one server over 1, 2, ... GPUs, in the same run
        accel = ["--acceleration", args.acceleration, "--max-batch-patches", str(args.max_batch_patches)]
        result["scaling"] = []
        for side in [int(v) for v in args.sides.split(",")]:
            configs = [
                (devices, None, int(frontends))
                for entry in args.scaling_devices.split(";")
                for devices, _, fixed in [entry.partition("@")]
                for frontends in ([fixed] if fixed else args.scaling_frontends.split(";"))
            ]
            if args.kill_encoder_at is not None:
                killed = [(devices, args.kill_encoder_at, fe) for devices, _, fe in configs if "," in devices][-1:]
                configs = killed if args.kill_only else configs + killed
            for devices, kill_at, frontends in configs:
                count = len(devices.split(","))
                extra = [*accel, "--warmup-image-sizes", f"{side}x{side}", "--frontends", str(frontends)]
                run = bench_service(
                    ckpt,
                    devices,
                    side,
                    args.clients * count,
                    args.seconds,
                    extra,
                    out / "server.log",
                    not args.single_trip,
                    args.warmup_seconds,
                    kill_at,
                )
                row = {
                    "side": side,
                    "devices": devices,
                    "gpus": count,
                    "frontends": frontends,
                    "encoder_killed_at_s": kill_at,
                    **run,
                }
                result["scaling"].append(row)
                print("scaling", json.dumps({k: v for k, v in row.items() if "ms" not in k}), flush=True)
                save()
    print(tables(result))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
