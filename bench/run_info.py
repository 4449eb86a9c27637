"""What a benchmark result records about where it ran, and the free port its servers take."""

from __future__ import annotations

import datetime
import io
import os
import socket
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def commit() -> str:
    """$VITCACHE_COMMIT if set (a copy of the tree whose .git is absent or stale), else the checkout's
    commit, else "unknown"."""
    if os.environ.get("VITCACHE_COMMIT"):
        return os.environ["VITCACHE_COMMIT"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def utc_stamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jpeg(height: int, width: int, seed: int) -> bytes:
    """A photo-like JPEG of random smooth content (numpy and PIL imported here, for the benches that make images)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    # Smooth content compresses like a photo; noise would make the files unrealistically large.
    base = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((width, height), Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def proc_stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, ...); None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def children(pid: int) -> list[int]:
    """The processes ``pid`` started, theirs too (an encoder process, its compile workers)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := proc_stat(entry.name)) is not None:
            parents[int(entry.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def is_frontend(pid: int) -> bool:
    """A ``--frontends`` process: they name themselves vitcache-feN (``frontend.PROCESS_NAME_PREFIX``; not
    imported here, which would load the server into every benchmark)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().startswith("vitcache-fe")
    except OSError:
        return False


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far, all threads (0 once it is gone)."""
    fields = proc_stat(pid)
    return 0.0 if fields is None else (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until_serving(target: str, server: subprocess.Popen, where_to_look: str) -> None:
    """Returns once the server at ``target`` answers ModelInfo; raises if its process exits first."""
    from vitcache.client import VitCacheClient

    with VitCacheClient(target) as client:
        while True:
            try:
                client.model_info(timeout=1)
                return
            except Exception:
                if server.poll() is not None:
                    raise RuntimeError(f"server exited with {server.returncode}; {where_to_look}") from None
                time.sleep(0.5)
