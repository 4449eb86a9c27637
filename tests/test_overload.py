"""Overload: a bounded queue of misses and per-call deadlines, on a real server and model."""

from __future__ import annotations

import time

import grpc
import pytest
from vitcache.client import VitCacheClient
from vitcache.server.app import ServerConfig

from vitcache.engine import EngineConfig

from .conftest import png_bytes


def test_misses_beyond_the_queue_bound_fail_fast_and_alone(start_server_thread, encoder) -> None:  # type: ignore[no-untyped-def]
    srv = start_server_thread(ServerConfig(engine=EngineConfig(max_queued_images=2)), encoder)
    images = [png_bytes(56, 56, 100 + i) for i in range(6)]
    with VitCacheClient(srv.target) as client:
        results = client.encode(images)
        stats = client.stats()
        ok = [r for r in results if r.ok]
        refused = [r for r in results if not r.ok]
        # All six reach admission in one loop turn: exactly the bound is taken, the rest refused.
        assert len(ok) == 2 and len(refused) == 4
        assert all(r.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)  # type: ignore[union-attr]
        assert all("--max-queued-images" in r.error.message for r in refused)  # type: ignore[union-attr]
        assert stats.overloaded == 4 and stats.images_computed == 2 and stats.l1_entries == 2
        # Nothing of the refused images was kept; once the queue drains they are served.
        retry = client.encode([images[r.index] for r in refused[:2]])
        assert [r.source for r in retry] == ["COMPUTED", "COMPUTED"]


def test_an_image_whose_deadline_passes_while_queued_never_reaches_the_device(start_server_thread, encoder) -> None:  # type: ignore[no-untyped-def]
    # The batcher holds a lone image for up to 1.5 s waiting for company; the call allows 0.3 s.
    cfg = ServerConfig(engine=EngineConfig(max_batch_wait_s=1.5))
    srv = start_server_thread(cfg, encoder)
    with VitCacheClient(srv.target) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.encode([png_bytes(56, 56, 200)], timeout=0.3)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        stats = client.stats()
        for _ in range(40):  # the server drops it when the batch closes (<= 1.5 s)
            if stats.deadline_expired:
                break
            time.sleep(0.1)
            stats = client.stats()
        assert stats.deadline_expired == 1 and stats.batches == 0 and stats.images_computed == 0
        assert stats.l1_entries == 0
        # Without a deadline the same image is computed.
        assert client.encode([png_bytes(56, 56, 200)])[0].source == "COMPUTED"
