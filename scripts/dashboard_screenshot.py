"""Takes docs/dashboard.png: the dashboard of a real server under a real load test.

    .venv/bin/python scripts/dashboard_screenshot.py [--seconds 45] [--out docs/dashboard.png]

Starts a redis-server and ``vitcache serve`` (tiny-random, a small L1 so that L2 serves too) on
loopback, drives them with ``vitcache loadtest`` (open loop, Zipf popularity) and screenshots the
page in headless Chromium (see tests/browser.py) once the charts have a history.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vitcache.client import VitCacheClient  # noqa: E402

from tests.browser import start_chromium  # noqa: E402
from tests.conftest import RedisProcess, free_port  # noqa: E402


def wait_ready(target: str, server: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    with VitCacheClient(target) as client:
        while time.monotonic() < deadline and server.poll() is None:
            try:
                client.model_info(timeout=1)
                return
            except Exception:
                time.sleep(0.2)
    raise RuntimeError("the server did not start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=45.0, help="load before the screenshot")
    parser.add_argument("--out", type=Path, default=REPO / "docs/dashboard.png")
    args = parser.parse_args()
    vitcache = [sys.executable, "-m", "vitcache.server.cli", "--log-level", "WARNING"]
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisProcess(Path(tmp) / "redis")
        redis.start()
        port, metrics_port = free_port(), free_port()
        serve = ["serve", "--port", str(port), "--metrics-port", str(metrics_port), "--redis-url", redis.url]
        server = subprocess.Popen([*vitcache, *serve, "--l1-bytes", "3MiB"])
        load = None
        browser = None
        try:
            wait_ready(f"127.0.0.1:{port}", server)
            traffic = ["--rate", "25", "--duration", "600", "--pool-size", "300", "--zipf-exponent", "0.9"]
            images = ["--image-size", "448x336", "--image-size", "336x336", "--images-per-request", "2"]
            load = subprocess.Popen(
                [*vitcache, "loadtest", "--target", f"127.0.0.1:{port}", *traffic, *images, "--no-progress"],
                stdout=subprocess.DEVNULL,
            )
            browser = start_chromium(Path(tmp) / "profile", width=1400, height=1500)
            browser.get(f"http://127.0.0.1:{metrics_port}/?interval=1000&window=10")
            time.sleep(args.seconds)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(args.out))
            print(f"wrote {args.out}")
        finally:
            if browser is not None:
                browser.quit()
            for process in (load, server):
                if process is not None:
                    process.terminate()
                    process.wait(timeout=30)
            redis.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
