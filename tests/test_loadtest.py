"""`vitcache loadtest` against a real gRPC server on loopback (tiny Qwen2.5-VL), in both modes."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from vitcache.client import Video
from vitcache.client.loadtest import ImagePool, LoadConfig, run_loadtest, simulate_lru
from vitcache.server import cli

from vitcache.config import VitcacheConfig

from .conftest import png_bytes

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def server(start_server_thread, encoder):  # type: ignore[no-untyped-def]
    return start_server_thread(VitcacheConfig.of(), encoder)


def test_simulated_lru_matches_a_hand_computed_sequence() -> None:
    a, b, c = b"a" * 16, b"b" * 16, b"c" * 16
    sequence = [(a, 4), (b, 4), (a, 4), (c, 4), (b, 4), (a, 4)]
    # 8 bytes hold two: a b | a hit | c evicts b | b evicts a | a evicts c  -> 1 hit of 6.
    assert simulate_lru(sequence, 8) == pytest.approx(1 / 6)
    # 12 bytes hold all three: only the first access of each misses.
    assert simulate_lru(sequence, 12) == pytest.approx(3 / 6)
    # An entry larger than the whole cache is never stored (as in the server's L1).
    assert simulate_lru(sequence, 3) == 0
    # A large entry evicts as many small ones as it needs: a b (8), c of 8 evicts both, a misses.
    assert simulate_lru([(a, 4), (b, 4), (c, 8), (a, 4), (c, 8)], 12) == pytest.approx(1 / 5)
    assert simulate_lru([], 100) is None


def test_the_load_test_imports_neither_redis_nor_the_server() -> None:
    """It simulates L1 with the server's own LRU (``vitcache.cache.l1``), not through the Redis tier."""
    probe = (
        "import sys, vitcache.client.loadtest; "
        "print(sorted(m for m in ('redis', 'vitcache.cache.tiers', 'vitcache.server') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_zipf_pool_popularity_and_synthetic_images() -> None:
    pool = ImagePool(50, zipf_exponent=1.2, seed=3, image_sizes=[(64, 48), (40, 80)])
    assert pool.probabilities.sum() == pytest.approx(1)
    assert pool.probabilities[0] / pool.probabilities[1] == pytest.approx(2**1.2)
    assert pool.probabilities[0] / pool.probabilities[9] == pytest.approx(10**1.2)
    draws = pool.draw(20_000)
    counts = np.bincount(draws, minlength=50) / len(draws)
    np.testing.assert_allclose(counts[:3], pool.probabilities[:3], rtol=0.08)
    assert ImagePool(50, 1.2, seed=3, image_sizes=[(64, 48), (40, 80)]).draw(20) == draws[:20]  # seeded
    sizes = {Image.open(io.BytesIO(pool.image(i))).size for i in range(20)}
    assert sizes == {(64, 48), (40, 80)}
    assert pool.image(7) == pool.image(7) != pool.image(8)


def test_closed_loop_report_plots_and_lru_against_a_real_server(server, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "report"
    args = ["loadtest", "--target", server.target, "--concurrency", "2", "--max-requests", "24", "--duration", "60"]
    args += ["--pool-size", "6", "--zipf-exponent", "0.8", "--image-size", "56x56", "--image-size", "84x56"]
    args += ["--images-per-request", "2", "--lru-bytes", "1KiB", "--no-progress", "--output-dir", str(out)]
    assert cli.main(args) == 0
    report = json.loads((out / "report.json").read_text())

    assert report["config"]["mode"] == "closed" and report["config"]["concurrency"] == 2
    assert report["requests"] == {"sent": 24, "answered": 24, "failed": 0, "dropped": 0}
    images = report["images"]
    assert images["answered"] == 48 and images["errors"] == 0 and report["errors_by_code"] == {}
    assert images["L1"] + images["COMPUTED"] == 48 and images["L2"] == 0  # no Redis
    assert report["hit_ratio"]["overall"] == pytest.approx(images["L1"] / 48)
    assert report["hit_ratio"]["L2"] == 0
    lat = report["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert report["throughput"]["requests_per_s"] > 0 and report["throughput"]["images_per_s"] > 0
    assert sum(point["requests"] for point in report["timeline"]) == 24

    lru = report["lru"]
    assert lru["accesses"] == 48 and 1 <= lru["distinct_images"] <= 6
    assert lru["infinite_cache_hit_ratio"] == pytest.approx(1 - lru["distinct_images"] / 48)
    by_what = {sim["what"]: sim for sim in lru["simulated"]}
    server_l1 = by_what["server L1 (--l1-bytes)"]
    assert server_l1["capacity_bytes"] == 2 << 30
    # The server's L1 holds everything, so the ideal LRU of its size misses only first accesses; the
    # server itself can only do worse (two concurrent first requests for one image both count as computed).
    assert server_l1["hit_ratio"] == pytest.approx(lru["infinite_cache_hit_ratio"])
    assert report["hit_ratio"]["overall"] <= server_l1["hit_ratio"] + 1e-9
    assert by_what["--lru-bytes"]["capacity_bytes"] == 1024
    ratios = [sim["hit_ratio"] for sim in lru["simulated"]]
    assert ratios == sorted(ratios)  # a bigger LRU never hits less on the same sequence

    for name in ("latency_cdf.png", "hit_ratio.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and Image.open(io.BytesIO(data)).size[0] >= 600
    printed = capsys.readouterr().out
    assert "24 requests" in printed and "ideal LRU" in printed and "server L1 (--l1-bytes)" in printed


def test_open_loop_counts_errors_by_code_and_stops_at_its_bounds(server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.png").write_bytes(png_bytes(56, 56, 200 + i))
    (folder / "broken.png").write_bytes(b"\x89PNG but not really")
    config = LoadConfig(
        target=server.target,
        mode="open",
        rate=40.0,
        duration_s=60.0,
        max_requests=30,
        pool_size=10,
        zipf_exponent=0.5,
        image_dir=str(folder),
        progress=False,
    )
    report, test = asyncio.run(run_loadtest(config))
    assert test.pool.size == 5
    broken = next(i for i in range(5) if test.pool.image(i).startswith(b"\x89PNG but"))
    sent_broken = sum(record.images.count(broken) for record in test.records)
    assert sent_broken > 0  # seed 0 draws it; the pool is small
    assert report["requests"]["sent"] + report["requests"]["dropped"] == 30
    assert report["errors_by_code"] == {"INVALID_ARGUMENT": sent_broken}
    assert report["images"]["errors"] == sent_broken
    assert report["images"]["answered"] == report["requests"]["answered"] - sent_broken
    # Open loop: 30 requests at 40/s are scheduled over 0.75 s, whatever the server does.
    assert max(record.start_s for record in test.records) == pytest.approx(29 / 40)

    timed = LoadConfig(target=server.target, mode="open", rate=20.0, duration_s=0.5, pool_size=3, progress=False)
    report, test = asyncio.run(run_loadtest(timed))
    assert report["requests"]["sent"] == 10  # 0.5 s at 20/s: starts at 0, 0.05, ..., 0.45
    assert test.elapsed_s < 30


def test_unreachable_target_fails_fast_with_a_clear_message(capsys) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # nothing listens once the socket is closed
    code = cli.main(["loadtest", "--target", f"127.0.0.1:{port}", "--max-requests", "3", "--no-progress"])
    assert code == 2
    assert f"cannot reach 127.0.0.1:{port}: UNAVAILABLE" in capsys.readouterr().err


def test_a_mix_of_images_and_clips(server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """--video-fraction makes that share of the synthetic pool 2-second MP4 clips, sent as Video items."""
    pool = ImagePool(40, 1.0, seed=1, image_sizes=[(64, 48)], video_fraction=0.5)
    kinds = [isinstance(pool.image(i), Video) for i in range(40)]
    assert 10 < sum(kinds) < 30
    out = tmp_path / "report"
    args = ["loadtest", "--target", server.target, "--concurrency", "2", "--max-requests", "12", "--pool-size", "4"]
    args += ["--image-size", "64x48", "--video-fraction", "1", "--no-progress", "--output-dir", str(out)]
    assert cli.main(args) == 0
    images = json.loads((out / "report.json").read_text())["images"]
    assert images["answered"] == images["videos"] == 12 and images["errors"] == 0
