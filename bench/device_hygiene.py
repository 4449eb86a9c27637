"""Device hygiene on a GPU machine: vitcache's clients open no CUDA context; the pattern it replaces opens one each.

    python bench/device_hygiene.py        # < 2 min; prints a table, writes bench/results/device_hygiene-*.json

1. A vitcache server runs in this process (built-in tiny-random tower, L1 only, no Redis), with one
   encoder process per GPU of ``--device`` (``cuda:0`` by default; ``cuda:0,cuda:1`` for two): each
   encoder process must hold a context on its own GPU and no other, and this (serving) process none.
   4 client processes (the "TP workers"; two take results in shared memory, two over gRPC)
   encode the same images and hold their embeddings while ``nvidia-smi --query-compute-apps``
   is read: none of them may appear, none may have opened the driver (/dev/nvidia*), and
   ``torch.cuda.is_initialized()`` must be false in each.
2. A process that only does ``torch.zeros(1, device="cuda")``: what one bare CUDA context costs.
3. The pre-fix pattern: a CUDA tensor (one embedding) pickled to 4 workers through
   torch.multiprocessing; each worker that touches it opens a context of its own.
Exits non-zero if a vitcache client opened a context.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from run_info import REPO, commit, is_frontend, utc_stamp

CLIENTS = 4
WAIT_S = 90


def compute_apps() -> dict[int, int]:
    """pid -> MiB of GPU memory, as nvidia-smi reports them."""
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    apps = {}
    for line in out.splitlines():
        if line.strip():
            pid, used = (field.strip() for field in line.split(","))
            apps[int(pid)] = int(used) if used.isdigit() else 0
    return apps


def compute_app_gpus() -> dict[int, set[int]]:
    """pid -> the indices of the GPUs it holds a context on (nvidia-smi names GPUs by UUID)."""

    def query(what: str) -> list[list[str]]:
        out = subprocess.run(
            ["nvidia-smi", f"--query-{what}", "--format=csv,noheader"], capture_output=True, text=True, check=True
        ).stdout
        return [[field.strip() for field in line.split(",")] for line in out.splitlines() if line.strip()]

    index_of = {uuid: int(index) for index, uuid in query("gpu=index,uuid")}
    apps: dict[int, set[int]] = {}
    for pid, uuid in query("compute-apps=pid,gpu_uuid"):
        apps.setdefault(int(pid), set()).add(index_of[uuid])
    return apps


def encoder_processes(server_pid: int, clients: set[int]) -> list[int]:
    """The serving process's encoder processes: its multiprocessing spawn children other than ``clients``
    (children of any of its threads: the server runs in a thread of its own)."""
    children = {
        int(pid)
        for task in Path(f"/proc/{server_pid}/task").iterdir()
        for pid in (task / "children").read_text().split()
    }
    return sorted(pid for pid in children - clients if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes())


def gpu_memory_used_mib() -> int:
    out = subprocess.run(
        ["nvidia-smi", "--id=0", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.split()[0])


def opened_driver(pid: int) -> bool:
    """Whether ``pid`` holds a /dev/nvidia* device open (it called into the CUDA driver)."""
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            if os.readlink(fd).startswith("/dev/nvidia"):
                return True
        except OSError:
            continue
    return False


def vitcache_client(index: int, target: str, shm_socket: str, reports: mp.Queue, release: mp.Event) -> None:  # type: ignore[type-arg]
    import numpy as np
    from vitcache.client import VitCacheClient

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (448, 448, 3), dtype=np.uint8) for _ in range(4)]
    transport = "shm" if index % 2 == 0 else "grpc"
    with VitCacheClient(target, shm_socket=shm_socket if transport == "shm" else None) as client:
        results = [r.raise_for_error() for r in client.encode(images)]
        held = [t for r in results for t in r.embeddings]  # kept alive while nvidia-smi looks
        reports.put(
            {
                "pid": os.getpid(),
                "transport": transport,
                "sources": [r.source for r in results],
                "bytes": sum(t.nbytes for t in held),
                "cuda_initialized": torch.cuda.is_initialized(),
            }
        )
        release.wait(WAIT_S)


def bare_context(reports: mp.Queue, release: mp.Event) -> None:  # type: ignore[type-arg]
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    reports.put({"pid": os.getpid()})
    release.wait(WAIT_S)


def prefix_worker(rank: int, embedding: torch.Tensor, reports: mp.Queue, release: mp.Event) -> None:  # type: ignore[type-arg]
    checksum = float(embedding.float().sum())  # touching the shared CUDA tensor opens this process's context
    reports.put({"pid": os.getpid(), "rank": rank, "checksum": checksum})
    release.wait(WAIT_S)


def gather(target, args, count: int) -> tuple[list[dict], list[mp.Process], mp.Event]:  # type: ignore[no-untyped-def,type-arg]
    """Starts ``count`` processes of ``target`` (spawn), waits for their reports; they hold until released."""
    ctx = mp.get_context("spawn")
    reports, release = ctx.Queue(), ctx.Event()
    processes = [ctx.Process(target=target, args=(*args(i), reports, release)) for i in range(count)]
    for process in processes:
        process.start()
    received: list[dict] = []
    deadline = time.monotonic() + WAIT_S
    while len(received) < count:
        try:
            received.append(reports.get(timeout=1))
        except queue.Empty:
            failed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                finish(processes, release)
                raise RuntimeError(f"{target.__name__}: processes failed ({failed}) or timed out") from None
    return received, processes, release


def finish(processes: list[mp.Process], release: mp.Event) -> None:  # type: ignore[type-arg]
    release.set()
    for process in processes:
        process.join(timeout=30)


def main() -> int:
    from vitcache.server.background import BackgroundServer

    from vitcache.config import VitcacheConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument("--device", default="cuda:0", help="the server's --device, e.g. cuda:0,cuda:1")
    parser.add_argument("--frontends", type=int, default=0, help="the server's --frontends")
    args = parser.parse_args()
    wanted_gpus = [int(d.split(":")[1]) for d in args.device.split(",")]
    started = time.monotonic()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="vitcache-hygiene-") as workdir:
        shm_socket = os.path.join(workdir, "shm", "vitcache.sock")
        server = BackgroundServer(
            VitcacheConfig.of(device=args.device, port=0, shm_socket=shm_socket, frontends=args.frontends)
        )
        try:
            baseline_mib = gpu_memory_used_mib()
            clients, processes, release = gather(vitcache_client, lambda i: (i, server.target, shm_socket), CLIENTS)
            apps, used_mib = compute_apps(), gpu_memory_used_mib()
            for report in clients:
                rows.append(
                    {
                        "case": f"vitcache client ({report['transport']})",
                        "pid": report["pid"],
                        "in_nvidia_smi": report["pid"] in apps,
                        "gpu_mib": apps.get(report["pid"], 0),
                        "opened_driver": opened_driver(report["pid"]),
                        "cuda_initialized": report["cuda_initialized"],
                        "sources": report["sources"],
                    }
                )
            server_visible = os.getpid() in apps
            app_gpus = compute_app_gpus()
            spawned = encoder_processes(os.getpid(), {report["pid"] for report in clients})
            encoders = [
                {"pid": pid, "gpus": sorted(app_gpus.get(pid, set())), "opened_driver": opened_driver(pid)}
                for pid in spawned
                if not is_frontend(pid)
            ]
            for pid in filter(is_frontend, spawned):
                rows.append(
                    {
                        "case": "vitcache front-end process",
                        "pid": pid,
                        "in_nvidia_smi": pid in apps,
                        "gpu_mib": apps.get(pid, 0),
                        "opened_driver": opened_driver(pid),
                        "cuda_initialized": None,  # not asked: its maps (opened_driver) tell
                    }
                )
            server_serving_mib = used_mib - baseline_mib
            finish(processes, release)
        finally:
            server.stop()

    before_mib = gpu_memory_used_mib()
    (bare,), processes, release = gather(bare_context, lambda i: (), 1)
    apps, used_mib = compute_apps(), gpu_memory_used_mib()
    bare_mib = apps.get(bare["pid"], 0)
    rows.append(
        {
            "case": "bare CUDA context",
            "pid": bare["pid"],
            "in_nvidia_smi": bare["pid"] in apps,
            "gpu_mib": bare_mib,
            "opened_driver": opened_driver(bare["pid"]),
            "cuda_initialized": True,
        }
    )
    bare_delta_mib = used_mib - before_mib
    finish(processes, release)

    embedding = torch.randn(256, 3584, device="cuda:0").to(torch.bfloat16)  # one 448x448 Qwen2.5-VL-7B image
    before_mib = gpu_memory_used_mib()
    workers, processes, release = gather(prefix_worker, lambda i: (i, embedding), CLIENTS)
    apps, used_mib = compute_apps(), gpu_memory_used_mib()
    for report in workers:
        rows.append(
            {
                "case": "pre-fix: CUDA tensor pickled to worker",
                "pid": report["pid"],
                "in_nvidia_smi": report["pid"] in apps,
                "gpu_mib": apps.get(report["pid"], 0),
                "opened_driver": opened_driver(report["pid"]),
                "cuda_initialized": True,
            }
        )
    prefix_delta_mib = used_mib - before_mib
    finish(processes, release)
    torch.cuda.ipc_collect()  # the workers are gone: free what they shared before this process exits

    device = torch.cuda.get_device_name(0)
    print(f"\ndevice hygiene on {device} (nvidia-smi lists this process, the server: {server_visible})")
    print(f"{'case':<42}{'pid':>8}{'in nvidia-smi':>15}{'GPU MiB':>9}{'driver open':>13}{'cuda init':>11}")
    for row in rows:
        print(
            f"{row['case']:<42}{row['pid']:>8}{row['in_nvidia_smi']!s:>15}{row['gpu_mib']:>9}"
            f"{row['opened_driver']!s:>13}{row['cuda_initialized']!s:>11}"
        )
    print(
        f"GPU memory used, change: the server serving 4 clients {server_serving_mib:+d} MiB, one bare context "
        f"{bare_delta_mib:+d} MiB, 4 pre-fix workers {prefix_delta_mib:+d} MiB"
    )
    vitcache_rows = [r for r in rows if r["case"].startswith("vitcache")]
    clean = not any(r["in_nvidia_smi"] or r["opened_driver"] or r["cuda_initialized"] for r in vitcache_rows)
    print("vitcache clients opened no CUDA context" if clean else "A VITCACHE CLIENT OPENED A CUDA CONTEXT")
    for encoder in encoders:
        print(f"encoder process {encoder['pid']}: contexts on GPU(s) {encoder['gpus']}")
    # One encoder per wanted GPU, each with a context on exactly one GPU, together covering them all.
    encoders_own_gpu = sorted(g for e in encoders for g in e["gpus"]) == sorted(wanted_gpus) and all(
        len(e["gpus"]) == 1 for e in encoders
    )
    print(
        f"each encoder process holds a context on its own GPU only: {encoders_own_gpu}; "
        f"the serving process holds none: {not server_visible}"
    )

    date = utc_stamp()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"device_hygiene-{date}.json"
    result = {
        "device": device,
        "commit": commit(),
        "date": date,
        "torch": torch.__version__,
        "server_device": args.device,
        "server_pid_in_nvidia_smi": server_visible,
        "encoder_processes": encoders,
        "encoders_own_gpu_only": encoders_own_gpu,
        "gpu_mib_change": {
            "server_while_serving_clients": server_serving_mib,
            "bare_context": bare_delta_mib,
            "prefix_workers": prefix_delta_mib,
        },
        "bare_context_mib": bare_mib,
        "clients_clean": clean,
        "rows": rows,
        "seconds": round(time.monotonic() - started, 1),
    }
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path} in {result['seconds']} s")
    return 0 if clean and encoders_own_gpu and not server_visible else 1


if __name__ == "__main__":
    sys.exit(main())
