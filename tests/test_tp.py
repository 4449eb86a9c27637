"""TP fan-out and device hygiene: examples/tp_fanout.py with 4 CPU ranks (torch.multiprocessing spawn,
gloo on loopback) against a real server on loopback, rank 0 encoding and the others fetching in shared memory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import xxhash
from vitcache.client.tp import rank_device
from vitcache.server.background import BackgroundServer

from vitcache.config import VitcacheConfig

from .conftest import server_thread

REPO = Path(__file__).resolve().parent.parent
WORLD_SIZE = 4


@pytest.fixture(scope="module")
def fanout(encoder) -> Iterator[tuple[list[dict], BackgroundServer]]:  # type: ignore[no-untyped-def]
    """Every rank's report of one run of the example, and the server it ran against."""
    workdir = Path(tempfile.mkdtemp(prefix="vctp-"))
    shm_socket = workdir / "shm" / "vitcache.sock"
    server = server_thread(VitcacheConfig.of(shm_socket=str(shm_socket)), encoder)
    try:
        report = workdir / "report.json"
        command = [sys.executable, "examples/tp_fanout.py", "--target", server.target, "--shm-socket", str(shm_socket)]
        command += ["--world-size", str(WORLD_SIZE), "--report", str(report)]
        subprocess.run(command, cwd=REPO, check=True, timeout=240)
        yield json.loads(report.read_text()), server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_every_rank_receives_identical_bytes(fanout) -> None:  # type: ignore[no-untyped-def]
    reports, server = fanout
    assert sorted(r["rank"] for r in reports) == list(range(WORLD_SIZE))
    assert len({r["pid"] for r in reports}) == WORLD_SIZE
    # What the server holds for each digest, hashed here, independently of the ranks.
    expected = []
    for digest in reports[0]["digests"]:
        entry = server.engine.l1.get(bytes.fromhex(digest))
        checksum = xxhash.xxh3_64()
        for out in entry.outputs:
            checksum.update(out.data)
        expected.append(checksum.hexdigest())
    assert len(expected) == 4
    for report in reports:
        assert report["digests"] == reports[0]["digests"]
        assert report["checksums"] == expected, f"rank {report['rank']} received other bytes"
    assert reports[0]["sources"] == ["COMPUTED"] * 4  # rank 0 encoded
    assert all(r["sources"] == ["L1"] * 4 for r in reports[1:])  # the others only fetched
    assert server.engine.stats.l1_hits >= (WORLD_SIZE - 1) * 4


def test_tp_workers_never_initialise_cuda(fanout) -> None:  # type: ignore[no-untyped-def]
    reports, _ = fanout
    assert len(reports) == WORLD_SIZE
    assert [r["cuda_initialized"] for r in reports] == [False] * WORLD_SIZE


def test_each_rank_moves_its_tensors_to_its_own_gpu(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """``--device cuda`` put every rank on cuda:0 (the current device of a fresh process)."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert [rank_device("cuda", rank) for rank in range(4)] == [torch.device("cuda", i) for i in range(4)]
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun on a second host: global rank 9 is that host's rank 1
    assert rank_device("cuda", 9) == torch.device("cuda", 1)
    assert rank_device("cpu", 9) == torch.device("cpu") and rank_device(None, 9) is None
    with pytest.raises(ValueError, match="every rank on one GPU"):
        rank_device("cuda:0", 2)
