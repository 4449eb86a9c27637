"""CPU seconds the serving process spends per image, on a CPU-only machine, and where they go.

    python bench/serving_cpu.py                       # misses then hits, 4 clients, 448x448; writes bench/results/
    python bench/serving_cpu.py --profile --top 30    # the same, the server's main thread under cProfile

The server is ``vitcache serve --device cpu --encoder-process on --model tiny-random``: the model's work
(decode, preprocessing, forward) runs in the encoder process, so the serving process's own CPU (gRPC,
digests, L1, single flight, the pool's dispatch, the copies out of the ring) is what is left. It is
read from /proc/PID/stat (utime + stime of that process only, its children excluded), per thread from
/proc/PID/task/*/stat. Clients are separate processes sending hash-first requests of 1-4 JPEGs: new
bytes every time (misses), or one fixed set looked up again and again (hits).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import multiprocessing as mp
import os
import pstats
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run_info import (
    REPO,
    children,
    commit,
    cpu_seconds,
    free_port,
    is_frontend,
    jpeg,
    proc_stat,
    utc_stamp,
    wait_until_serving,
)


def _client(target: str, seed: int, side: int, hits: bool, start, deadline, queue: mp.Queue) -> None:  # type: ignore[no-untyped-def]
    """Closed loop of hash-first requests of 1-4 images until ``deadline`` (a shared value)."""
    import numpy as np
    from vitcache.client import VitCacheClient

    rng = np.random.default_rng(seed)
    base = jpeg(side, side, seed)

    def new_images(count: int) -> list[bytes]:  # unique bytes: vary the JPEG comment segment
        return [base[:2] + b"\xff\xfe\x00\x10" + rng.bytes(14) + base[2:] for _ in range(count)]

    fixed = new_images(4)
    images = failed = 0
    with VitCacheClient(target) as client:
        if hits:
            assert all(r.ok for r in client.encode(fixed, timeout=120))
        queue.put("ready")
        start.wait()
        while time.time() < deadline.value:
            count = int(rng.integers(1, 5))
            results = client.encode(fixed[:count] if hits else new_images(count), timeout=120)
            images += sum(r.ok for r in results)
            failed += sum(not r.ok for r in results)
    queue.put((images, failed))


def _threads(pid: int) -> dict[str, float]:
    """CPU seconds so far of each thread of ``pid``, summed by thread name ("main" for the event loop's;
    Python threads other than the main one are all "python")."""
    by_name: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = proc_stat(f"{pid}/task/{task.name}")
        try:
            name = "main" if task.name == str(pid) else (task / "comm").read_text().strip()
        except OSError:
            continue
        if fields is not None:
            seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            by_name[name] = by_name.get(name, 0.0) + seconds
    return by_name


def run_load(target: str, server_pid: int, side: int, clients: int, seconds: float, hits: bool, seed: int) -> dict:
    """``clients`` client processes for ``seconds``; the server process's CPU per image meanwhile."""
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    start, deadline = ctx.Event(), ctx.Value("d", 0.0)
    procs = [
        ctx.Process(target=_client, args=(target, seed + i, side, hits, start, deadline, queue)) for i in range(clients)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        assert queue.get(timeout=300) == "ready"
    frontends = [pid for pid in children(server_pid) if is_frontend(pid)]
    cpu_before, threads_before = cpu_seconds(server_pid), _threads(server_pid)
    frontends_before = sum(cpu_seconds(pid) for pid in frontends)
    began = time.time()
    deadline.value = began + seconds
    start.set()
    totals = [queue.get(timeout=seconds + 300) for _ in procs]
    elapsed = time.time() - began
    cpu, threads_after = cpu_seconds(server_pid) - cpu_before, _threads(server_pid)
    frontends_cpu = sum(cpu_seconds(pid) for pid in frontends) - frontends_before
    for p in procs:
        p.join()
    images = sum(t[0] for t in totals)
    threads = {name: after - threads_before.get(name, 0.0) for name, after in threads_after.items()}
    return {
        "kind": "hit" if hits else "miss",
        "images": images,
        "failed": sum(t[1] for t in totals),
        "seconds": elapsed,
        "img_s": images / elapsed,
        "server_cores": cpu / elapsed,
        "server_cpu_ms_per_image": cpu / images * 1e3 if images else None,
        "frontends": len(frontends),
        "frontends_cores": frontends_cpu / elapsed,
        "frontends_cpu_ms_per_image": frontends_cpu / images * 1e3 if images else None,
        "threads_cpu_ms_per_image": {
            name: s / images * 1e3 for name, s in sorted(threads.items(), key=lambda kv: -kv[1]) if s > 0 and images
        },
    }


def serve_profiled(folder: str, argv: list[str]) -> None:
    """The server, in this process, with cProfile on its main thread (the event loop, where the
    Python work is) from each SIGUSR1 to the next SIGUSR2, which writes that span's stats to
    ``folder``/N.prof."""
    from vitcache.server.cli import main

    profiles: list[cProfile.Profile] = []

    def begin(*_: object) -> None:
        profiles.append(cProfile.Profile())
        profiles[-1].enable()

    def end(*_: object) -> None:
        profiles[-1].disable()
        profiles[-1].dump_stats(f"{folder}/{len(profiles) - 1}.prof.part")
        os.rename(f"{folder}/{len(profiles) - 1}.prof.part", f"{folder}/{len(profiles) - 1}.prof")

    signal.signal(signal.SIGUSR1, begin)
    signal.signal(signal.SIGUSR2, end)
    sys.exit(main(argv))


def top_functions(path: str, top: int) -> str:
    text = io.StringIO()
    stats = pstats.Stats(path, stream=text)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return text.getvalue()


def bench(args: argparse.Namespace, profile_to: str | None) -> dict:
    port = free_port()
    serve = ["--log-level", "WARNING", "serve", "--model", "tiny-random", "--device", "cpu", "--encoder-process", "on"]
    serve += ["--port", str(port), "--l1-bytes", "512MiB", "--frontends", str(args.frontends)]
    if profile_to:
        command = [sys.executable, str(Path(__file__).resolve()), "--serve-profiled", profile_to, "--", *serve]
    else:
        command = [sys.executable, "-m", "vitcache.server.cli", *serve]
    # Not in the repo root, whose folders would shadow the installed package.
    server = subprocess.Popen(command, cwd=tempfile.gettempdir())
    target = f"127.0.0.1:{port}"
    try:
        wait_until_serving(target, server, "its output is above")
        run_load(target, server.pid, args.side, args.clients, args.warmup_seconds, False, 0)
        runs = []
        for repeat in range(args.repeat):
            for kind in args.kinds.split(","):
                if profile_to:
                    os.kill(server.pid, signal.SIGUSR1)
                run = run_load(
                    target, server.pid, args.side, args.clients, args.seconds, kind == "hit", 1000 * (repeat + 1)
                )
                if profile_to:
                    os.kill(server.pid, signal.SIGUSR2)
                    while not (profiled := Path(profile_to) / f"{len(runs)}.prof").exists():
                        time.sleep(0.2)
                    run["profile_top"] = top_functions(str(profiled), args.top)
                    print(run["profile_top"], flush=True)
                print(json.dumps({k: v for k, v in run.items() if k != "profile_top"}), flush=True)
                runs.append(run)
        return {"runs": runs}
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--side", type=int, default=448)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--warmup-seconds", type=float, default=5)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each kind, alternating")
    parser.add_argument("--kinds", default="miss,hit")
    parser.add_argument("--frontends", type=int, default=0, help="the server's --frontends")
    parser.add_argument("--profile", action="store_true", help="cProfile the server's event loop thread, each run")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--label", default="", help="added to the result's file name")
    parser.add_argument("--serve-profiled", metavar="OUT", help=argparse.SUPPRESS)
    parser.add_argument("serve_argv", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_profiled:
        serve_profiled(args.serve_profiled, args.serve_argv)
        return
    profile_to = tempfile.mkdtemp() if args.profile else None
    result = {"commit": commit(), "date": utc_stamp(), "machine": f"{os.cpu_count()} CPUs", **vars(args)}
    result.pop("serve_argv")
    result.pop("serve_profiled")
    result.update(bench(args, profile_to))
    out = REPO / "bench" / "results" / f"serving_cpu-{result['date']}{'-' + args.label if args.label else ''}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
