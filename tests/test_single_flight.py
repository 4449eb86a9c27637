"""Single flight: concurrent identical misses are computed exactly once, however they interleave."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Iterator
from typing import TypeVar

import pytest
from vitcache.client import AsyncVitCacheClient

from vitcache.cache.entry import CachedEmbedding
from vitcache.cache.l1 import L1Cache
from vitcache.config import VitcacheConfig
from vitcache.encode.pipeline import EncodePipeline, PipelineConfig
from vitcache.engine import EmbeddingEngine
from vitcache.inputs import Computable, EncodedFile, Scope
from vitcache.models.loading import VisionEncoder
from vitcache.outcomes import Source

from .conftest import png_bytes

T = TypeVar("T")

ROUNDS = int(os.environ.get("VITCACHE_SOAK_ROUNDS", "100"))  # more, locally, to look harder
REQUESTS_PER_ROUND = 16
ARRIVALS_SPREAD_S = 0.05  # the requests of a round arrive over about one computation's time


@pytest.fixture
def cpu_contention() -> Iterator[None]:
    """A process that keeps a core busy, so the server's threads and event loop run in uneven slices.

    A process, not a thread of the server's: a spinning thread would hold the server's GIL, and every
    wake-up of its event loop (each Redis reply, each gRPC message) would wait out a switch interval,
    which measures the interpreter, not single flight.
    """
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    yield
    spinner.kill()
    spinner.wait()


async def _after(delay_s: float, call: Awaitable[T]) -> T:
    await asyncio.sleep(delay_s)
    return await call


async def _soak(target: str) -> list[tuple[int, list[str]]]:
    """Per round: how many times the round's image was computed, and what each request got."""
    rounds = []
    async with AsyncVitCacheClient(target) as client:
        for round_ in range(ROUNDS):
            image = png_bytes(56, 56, 9000 + round_)  # new to the server and to L2: a miss for every request
            before = (await client.stats(timeout=30)).images_computed
            answers = await asyncio.gather(
                *(
                    _after(i * ARRIVALS_SPREAD_S / REQUESTS_PER_ROUND, client.encode([image], timeout=30))
                    for i in range(REQUESTS_PER_ROUND)
                ),
                return_exceptions=True,
            )
            computed = (await client.stats(timeout=30)).images_computed - before
            got = [repr(a) if isinstance(a, BaseException) else a[0].source or repr(a[0].error) for a in answers]
            rounds.append((computed, got))
    return rounds


@pytest.mark.parametrize("with_redis", [False, True], ids=["l1-only", "redis-l2-and-fleet-lock"])
def test_rounds_of_concurrent_identical_misses_compute_once_and_all_finish(
    with_redis, start_server_thread, encoder, request, cpu_contention
) -> None:  # type: ignore[no-untyped-def]
    redis_url = request.getfixturevalue("redis_server").url if with_redis else None
    srv = start_server_thread(VitcacheConfig.of(redis_url=redis_url), encoder)
    started = time.monotonic()
    rounds = asyncio.run(asyncio.wait_for(_soak(srv.target), timeout=120))  # a hang fails, it does not stall
    elapsed = time.monotonic() - started
    failed = [(i, got) for i, (_, got) in enumerate(rounds) if set(got) - {"COMPUTED", "L1", "L2"}]
    assert not failed, f"requests failed (round, answers): {failed[:3]}"
    not_once = [(i, computed) for i, (computed, _) in enumerate(rounds) if computed != 1]
    assert not not_once, f"rounds not computed exactly once (round, computations): {not_once} in {elapsed:.1f} s"


class _ArrivalAtTheEnd(EncodePipeline):
    """A real pipeline that, as its first computation ends, lets a second request for the same image
    arrive: it looks in L1 before the entry is there and goes on after the computation is done."""

    def __init__(self, encoder: VisionEncoder, image: bytes) -> None:
        super().__init__(encoder, PipelineConfig())
        self.engine: EmbeddingEngine | None = None
        self.image = image
        self.late: asyncio.Task[list[Source | None]] | None = None

    async def compute(self, image: Computable, scope: Scope) -> CachedEmbedding:
        entry = await super().compute(image, scope)
        if self.late is None:
            assert self.engine is not None
            self.late = asyncio.ensure_future(self._request())
            await asyncio.sleep(0)  # the late request's L1 lookup runs now; its resolution after this one ends
        return entry

    async def _request(self) -> list[Source | None]:
        assert self.engine is not None
        return [outcome.source async for outcome in self.engine.encode([EncodedFile(self.image)])]


def test_a_request_arriving_as_the_computation_ends_uses_its_result(encoder) -> None:  # type: ignore[no-untyped-def]
    image = png_bytes(56, 56, 8000)

    async def run() -> tuple[list[Source | None], list[Source | None], int]:
        pipeline = _ArrivalAtTheEnd(encoder, image)
        engine = pipeline.engine = EmbeddingEngine(pipeline, L1Cache(64 << 20))
        await engine.start()
        try:
            first = [outcome.source async for outcome in engine.encode([EncodedFile(image)])]
            assert pipeline.late is not None
            return first, await pipeline.late, pipeline.stats.images
        finally:
            await engine.stop()

    first, late, computed = asyncio.run(run())
    assert first == [Source.COMPUTED] and late == [Source.L1] and computed == 1


def test_a_joiner_without_a_deadline_outlives_the_first_requests_deadline(start_server_thread, encoder) -> None:  # type: ignore[no-untyped-def]
    # A batch waits 3 s to fill: the first request's 1 s deadline passes while its image is queued.
    srv = start_server_thread(VitcacheConfig.of(max_batch_wait_s=3.0), encoder)
    image = png_bytes(56, 56, 8100)

    async def run() -> tuple[BaseException | None, str, str]:
        async with AsyncVitCacheClient(srv.target) as client:
            hurried, patient = await asyncio.gather(
                client.encode([image], timeout=1.0), _after(0.2, client.encode([image])), return_exceptions=True
            )
            stats = await client.stats()
        assert not isinstance(patient, BaseException)
        assert stats.images_computed == 1 and stats.deadline_expired == 1 and stats.single_flight_joins >= 1
        return hurried if isinstance(hurried, BaseException) else None, patient[0].source, repr(patient[0].error)

    hurried, source, error = asyncio.run(run())
    assert hurried is not None and "DEADLINE_EXCEEDED" in repr(hurried)
    assert source == "COMPUTED", error
