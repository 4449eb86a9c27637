"""The quick-start demo: a server on the built-in tiny-random model, three images, two passes.

The first pass computes every image, the second is served from the in-process cache (L1).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from vitcache.client import VitCacheClient


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    port, metrics_port = free_port(), free_port()
    target = f"127.0.0.1:{port}"
    serve = ["serve", "--model", "tiny-random", "--port", str(port), "--metrics-port", str(metrics_port)]
    server = subprocess.Popen([sys.executable, "-m", "vitcache.server.cli", *serve])
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rng = np.random.default_rng(0)
            files = []
            for name, (h, w) in {"cat.png": (224, 320), "dog.jpg": (480, 640), "chart.png": (300, 300)}.items():
                path = Path(tmp) / name
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
                files.append(str(path))
            with VitCacheClient(target) as client:
                deadline = time.monotonic() + 120
                while True:
                    try:
                        client.model_info(timeout=1)
                        break
                    except Exception:
                        if time.monotonic() > deadline or server.poll() is not None:
                            print("server did not start", file=sys.stderr)
                            return 1
                        time.sleep(0.2)
            cli = [sys.executable, "-m", "vitcache.server.cli", "--log-level", "WARNING"]
            for attempt in ("first pass (misses)", "second pass (hits)"):
                print(f"\n== vitcache encode: {attempt}", flush=True)
                subprocess.run([*cli, "encode", "--target", target, *files], check=True)
            print("\n== vitcache stats", flush=True)
            subprocess.run([*cli, "stats", "--metrics-url", f"http://127.0.0.1:{metrics_port}"], check=True)
        return 0
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
