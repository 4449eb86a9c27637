"""The decoded pixel budget: small files that decode to many pixels wait for room or are refused, never
all decoded at once; on its own (PixelBudget) and on a real server with the tiny model."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from vitcache.client import VitCacheClient

from vitcache.config import VitcacheConfig
from vitcache.encode.budget import PixelBudget
from vitcache.errors import ErrorCode, ImageError

from .conftest import png_bytes, solid_png


def test_budget_grants_in_order_and_a_waiter_that_gives_up_holds_nothing() -> None:
    async def run() -> None:
        budget = PixelBudget(10)
        await budget.take(6, None)
        granted: list[str] = []

        async def take(name: str, pixels: int, deadline: float | None = None) -> None:
            await budget.take(pixels, deadline)
            granted.append(name)

        big = asyncio.ensure_future(take("big", 8))
        small = asyncio.ensure_future(take("small", 2))  # would fit now, but waits behind the big one
        late = asyncio.ensure_future(take("late", 4, deadline=time.monotonic()))  # already past its deadline
        cancelled = asyncio.ensure_future(take("cancelled", 1))
        await asyncio.sleep(0)
        cancelled.cancel()
        with pytest.raises(ImageError) as exc:
            await late
        assert exc.value.code is ErrorCode.DEADLINE_EXCEEDED
        assert granted == [] and budget.in_use == 6
        budget.give_back(6)
        assert budget.in_use == 10 == budget.peak  # both granted at once, in arrival order
        await asyncio.gather(big, small)
        assert granted == ["big", "small"]
        await asyncio.gather(cancelled, return_exceptions=True)
        budget.give_back(8)
        budget.give_back(2)
        assert budget.in_use == 0 and granted == ["big", "small"]

        with pytest.raises(ImageError) as exc:
            await budget.take(11, None)
        assert exc.value.code is ErrorCode.RESOURCE_EXHAUSTED and "--max-decoded-pixels-in-flight" in exc.value.message

    asyncio.run(run())


def test_large_pngs_wait_for_the_budget_and_a_small_request_is_served(start_server_thread, encoder) -> None:  # type: ignore[no-untyped-def]
    # 2000x2000 PNGs of a few KB each: 4M pixels (about 64 MB while decoded and preprocessed); the
    # budget holds one of them, not two, while four preprocessing threads could take all four.
    budget = 6_000_000
    srv = start_server_thread(VitcacheConfig.of(max_decoded_pixels_in_flight=budget, preprocess_workers=4), encoder)
    large = [solid_png(2000, 2000, shade) for shade in range(4)]
    over_budget = solid_png(3000, 3000, 9)  # 9M pixels: under --max-image-pixels, over the whole budget
    assert all(len(data) < 40_000 for data in [*large, over_budget])
    small_results = []

    def small_request() -> None:  # a second client's, while the large images are queued or decoding
        with VitCacheClient(srv.target) as other:
            small_results.extend(other.encode([png_bytes(56, 56, 3)]))

    with VitCacheClient(srv.target) as client:
        small = threading.Thread(target=small_request)
        small.start()
        results = client.encode([*large, over_budget], hash_first=False)
        small.join()
    assert [r.source for r in results[:4]] == ["COMPUTED"] * 4, [r.error for r in results]
    refused = results[4].error
    assert refused is not None and refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-decoded-pixels-in-flight" in refused.message
    assert len(small_results) == 1 and small_results[0].ok
    pipeline = srv.engine.pipeline
    # Never two large images at once (the small one may have been in flight with one), all given back.
    assert 2000 * 2000 <= pipeline.stats.decoded_pixels_peak <= budget
    assert pipeline.budget.in_use == 0
