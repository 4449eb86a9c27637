"""What a benchmark result records about where it ran, and the free port its servers take."""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
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
