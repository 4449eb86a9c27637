"""The cache service without a transport: digest, look up L1 then L2, compute only misses.

The gRPC server is a thin layer over :class:`EmbeddingEngine`; anything that embeds
vitcache in-process (an inference server's own encoder path) can use it directly. The device
work of a miss is its :class:`~vitcache.encode.pipeline.Pipeline`'s, in this process or another.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine, Hashable, Sequence
from dataclasses import dataclass, field, replace

from vitcache.cache.entry import CachedEmbedding
from vitcache.cache.fleet_lock import FleetLock
from vitcache.cache.l1 import L1Cache, l1_key, l1_put_key
from vitcache.cache.tiers import RedisTier
from vitcache.config import LimitsConfig
from vitcache.digest import DIGEST_SIZE, digest_file, digest_pixels, digest_rgb, digest_video_file, digest_video_frames
from vitcache.encode.pipeline import EncodePipeline, Pipeline, PipelineConfig
from vitcache.errors import ErrorCode, ImageError
from vitcache.inputs import (
    MAX_PUT_KEY_BYTES,
    MAX_PUT_TENSORS,
    PUT_DTYPES,
    DigestOnly,
    EncodedFile,
    EncodedVideo,
    ImageInput,
    PixelRows,
    RawRGB,
    RawVideo,
    Scope,
)
from vitcache.models.loading import EncoderSpec, VisionEncoder
from vitcache.models.served import ServedModel
from vitcache.observer import EngineObserver
from vitcache.outcomes import ImageOutcome, Source
from vitcache.stats import (
    EngineSnapshot,
    EngineStats,
    L1Snapshot,
    L2Snapshot,
    ModelSnapshot,
    TenantStats,
    VideoStats,
)

log = logging.getLogger(__name__)

FAILED_IMAGE_TTL_S = 600.0
FAILED_IMAGE_MEMORY = 4096

#: Images ``encode`` admits in one turn of the event loop (a few ms) before letting other calls run.
_IMAGES_PER_LOOP_TURN = 256
#: Bytes a request's digests may read on the event loop (under 0.1 ms: xxh3 hashes ~40 GB/s, keyed BLAKE2b
#: ~0.6 GB/s); more go to a worker thread, whose hand-off costs the loop more than hashing a few images.
_INLINE_DIGEST_BYTES = 1 << 20
_INLINE_KEYED_DIGEST_BYTES = 64 << 10


@dataclass(frozen=True)
class EngineConfig:
    """The device side's settings (what an encoder process is sent) and the digest key (which is not)."""

    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    digest_key: bytes | None = None  # keyed digests (vitcache.digest); None = plain xxh3-128

    @property
    def limits(self) -> LimitsConfig:
        return self.pipeline.limits


class EmbeddingEngine:
    """Serves per-image embeddings from L1, L2 or one shared computation.

    Invariants:
    - At most one resolution (L2 lookup, then preprocessing and a forward) runs per digest
      at a time; concurrent requests for it wait on that one (single flight). A request that
      finds none running looks in L1 again before starting one: a computation may have ended
      (and still be listed, its done callback pending) since the request's first look.
    - A computed entry is in L1 before anyone is answered; the L2 write follows in the
      background (``drain`` waits for outstanding writes).
    - Every input image ends in exactly one :class:`ImageOutcome`; a failure of one image
      never fails another.
    - At most ``max_queued_images`` resolutions are in progress; a miss beyond that is
      refused at once (RESOURCE_EXHAUSTED) instead of queueing without bound.
    - With a ``fleet_lock``, a miss is also computed once across the replicas sharing L2;
      the holder's L2 write completes before it releases the lock.
    - An image whose computation failed INTERNAL (encoder processes died under it, its output
      is not finite) fails again without being computed for ``FAILED_IMAGE_TTL_S`` (the last
      ``FAILED_IMAGE_MEMORY`` such images): a poison image costs its encoders once, not per retry.
    """

    def __init__(
        self,
        encoder: VisionEncoder | Pipeline,
        l1: L1Cache,
        l2: RedisTier | None = None,
        config: EngineConfig | None = None,
        fleet_lock: FleetLock | None = None,
        observer: EngineObserver | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        self.observer = observer or EngineObserver()
        self.pipeline: Pipeline = (
            EncodePipeline(encoder, self.config.pipeline, self.observer)
            if isinstance(encoder, VisionEncoder)
            else encoder
        )
        self.l1 = l1
        self.l2 = l2
        self.fleet_lock = fleet_lock
        self.stats = EngineStats()
        self.video_stats = VideoStats()
        # Per-tenant counts, once count_by_tenant() asked for them (tenant names are the clients' to choose).
        self.tenant_stats: dict[str, TenantStats] | None = None
        self._inflight: dict[bytes, asyncio.Task[tuple[CachedEmbedding, Source]]] = {}
        self._l2_writes: set[asyncio.Future[None]] = set()
        self._failed_images: OrderedDict[bytes, tuple[float, ImageError]] = OrderedDict()  # key -> (until, error)

    @property
    def spec(self) -> EncoderSpec:
        """What the encoder computes (known once the pipeline has started)."""
        return self.pipeline.spec

    @property
    def served_model(self) -> ServedModel:
        """What the servicer answers GetModelInfo with and checks pixel batches against."""
        return self.spec.served

    def snapshot(self) -> EngineSnapshot:
        """The engine's numbers now, copied, so readers never reach into its parts."""
        model, l1, l2 = self.served_model, self.l1, self.l2
        return EngineSnapshot(
            uptime_s=self.uptime_s,
            model=ModelSnapshot(model.model_name, model.family, model.dtype, model.device, model.namespace),
            images=replace(self.stats),
            videos=replace(self.video_stats),
            l1=L1Snapshot(len(l1), l1.bytes_used, l1.capacity_bytes, l1.evictions),
            l2=L2Snapshot(
                enabled=l2 is not None,
                connected=l2 is not None and l2.connected,
                errors=l2.stats.errors if l2 else 0,
                corrupt=l2.stats.corrupt if l2 else 0,
                fleet_lock_waits=self.fleet_lock.waits if self.fleet_lock else 0,
            ),
            batcher=replace(self.pipeline.stats),
            encoders=[replace(status, stats=replace(status.stats)) for status in self.pipeline.encoders()],
            tenants={tenant: replace(counts) for tenant, counts in (self.tenant_stats or {}).items()},
        )

    async def snapshot_async(self) -> EngineSnapshot:
        """:meth:`snapshot`, as a transport awaits it (a front-end's engine is in another process)."""
        return self.snapshot()

    def count_by_tenant(self) -> None:
        """Keeps :attr:`tenant_stats` from now on (under authentication, where tokens bound the tenants)."""
        if self.tenant_stats is None:
            self.tenant_stats = {}

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.stats.started_at

    async def start(self) -> None:
        await self.pipeline.start()
        if self.l2 is not None:
            await self.l2.ping()

    async def stop(self) -> None:
        await self.drain()
        await self.pipeline.stop()
        if self.l2 is not None:
            await self.l2.close()

    async def drain(self) -> None:
        """Waits until every computed entry has been offered to L2."""
        while self._l2_writes:
            await asyncio.gather(*list(self._l2_writes), return_exceptions=True)

    async def encode(
        self, images: Sequence[ImageInput | ImageError], scope: Scope = Scope()
    ) -> AsyncIterator[ImageOutcome]:
        """Yields one outcome per image, in completion order.

        An :class:`ImageError` in ``images`` stands for an input the caller already found
        invalid; it comes back as that image's outcome.
        """
        # Memory answers (L1 hits, invalid inputs) need no task: a hit costs a dict lookup, not a
        # task and a trip through the event loop. Misses start resolving before hits are yielded.
        answered: list[ImageOutcome] = []
        tasks: list[asyncio.Future[ImageOutcome]] = []
        try:
            digests = await self._digests(images)
            for index, (image, digest) in enumerate(zip(images, digests, strict=True)):
                if index and index % _IMAGES_PER_LOOP_TURN == 0:
                    await asyncio.sleep(0)  # a request of many images lets other calls run in between
                answer = self._answer_from_memory(index, image, digest, scope)
                if isinstance(answer, ImageOutcome):
                    answered.append(answer)
                else:
                    tasks.append(asyncio.ensure_future(self._serve_miss(index, image, answer, scope)))  # type: ignore[arg-type]
            for outcome in answered:
                self._report(outcome, scope)
                yield outcome
            for next_done in asyncio.as_completed(tasks) if tasks else ():  # all hits: no Queue to build
                outcome = await next_done
                self._report(outcome, scope)
                yield outcome
        finally:
            for task in tasks:
                task.cancel()

    def _report(self, outcome: ImageOutcome, scope: Scope) -> None:
        self.observer.image_done(outcome)
        if outcome.is_video:
            self.video_stats.count(outcome)
        if self.tenant_stats is not None:
            self.tenant_stats.setdefault(scope.tenant, TenantStats()).count(outcome)

    async def fetch(self, digests: Sequence[bytes], scope: Scope = Scope()) -> AsyncIterator[ImageOutcome]:
        async for outcome in self.encode([DigestOnly(d) for d in digests], scope):
            yield outcome

    def count_shared_index_hits(self, digests: Sequence[bytes], scope: Scope) -> None:
        """Hits a same-host client read from the shared L1's index itself and reports afterwards: counted as the
        L1 hits served here are, and each refreshes its entry's recency. A digest L1 no longer holds is not
        counted: the server cannot tell it from one never read."""
        for digest in digests:
            entry = self.l1.get(l1_key(digest, scope.tenant))
            if entry is not None:
                self.observer.cache_lookup("l1", hit=True)
                self.stats.l1_hits += 1
                self._report(ImageOutcome(0, digest, entry, Source.L1), scope)

    async def put(self, key: str, entry: CachedEmbedding, scope: Scope = Scope()) -> None:
        """Stores a caller-computed entry under ``key``, in L1 and then L2 before returning.

        Put keys are a key space of their own (:func:`~vitcache.cache.l1.l1_put_key`,
        :meth:`~vitcache.cache.tiers.RedisTier.put_key`): a caller can never replace or shadow an entry
        computed from image bytes. Raises :class:`ImageError` for an entry it does not take.
        """
        self._check_put(key, entry)
        in_l1 = self.l1.put(l1_put_key(key, scope.tenant), entry)
        in_l2 = False
        if self.l2 is not None:
            with self.observer.timed("l2_put"):
                in_l2 = await self.l2.put_at(self.l2.put_key(key, scope.tenant), entry)
        if not (in_l1 or in_l2):
            raise ImageError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"a Put entry of {entry.nbytes} bytes is larger than L1 (--l1-bytes) and Redis did not take it",
            )
        self.stats.puts += 1
        if self.tenant_stats is not None:
            self.tenant_stats.setdefault(scope.tenant, TenantStats()).puts += 1

    async def fetch_keys(
        self, keys: Sequence[str], scope: Scope = Scope(), first_index: int = 0
    ) -> AsyncIterator[ImageOutcome]:
        """Entries stored by :meth:`put`, one outcome per key (NOT_FOUND if absent), indexed from ``first_index``."""
        lookups = [
            asyncio.ensure_future(self._fetch_key(first_index + offset, key, scope)) for offset, key in enumerate(keys)
        ]
        try:
            for next_done in asyncio.as_completed(lookups):
                outcome = await next_done
                self._report(outcome, scope)
                yield outcome
        finally:  # a cancelled Fetch leaves no lookup running
            for lookup in lookups:
                lookup.cancel()

    async def _fetch_key(self, index: int, key: str, scope: Scope) -> ImageOutcome:
        try:
            self._check_put_key(key)
            at = l1_put_key(key, scope.tenant)
            entry = self.l1.get(at)
            self.observer.cache_lookup("l1", hit=entry is not None)
            if entry is not None:
                self.stats.l1_hits += 1
                return ImageOutcome(index, b"", entry, Source.L1, key=key)
            if self.l2 is not None:
                entry = await self._from_l2_at(at, self.l2.put_key(key, scope.tenant))
            if entry is None:
                self.stats.not_found += 1
                raise ImageError(ErrorCode.NOT_FOUND, f"key {key!r} is not cached")
            self.stats.l2_hits += 1
            return ImageOutcome(index, b"", entry, Source.L2, key=key)
        except ImageError as exc:
            failed = self._failed(index, b"", exc)
            return replace(failed, key=key)

    @staticmethod
    def _check_put_key(key: str) -> None:
        if not 0 < len(key.encode()) <= MAX_PUT_KEY_BYTES:
            raise ImageError(ErrorCode.INVALID_ARGUMENT, f"a Put key must be 1 to {MAX_PUT_KEY_BYTES} bytes of UTF-8")

    def _check_put(self, key: str, entry: CachedEmbedding) -> None:
        self._check_put_key(key)
        if not 0 < len(entry.outputs) <= MAX_PUT_TENSORS:
            raise ImageError(ErrorCode.INVALID_ARGUMENT, f"a Put entry holds 1 to {MAX_PUT_TENSORS} tensors")
        if entry.nbytes > self.config.limits.max_put_bytes:
            raise ImageError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"a Put entry of {entry.nbytes} bytes is over --max-put-bytes={self.config.limits.max_put_bytes}",
            )
        if any(v < 0 for v in entry.grid_thw):
            raise ImageError(ErrorCode.INVALID_ARGUMENT, "grid_thw values must not be negative")
        for out in entry.outputs:
            if out.dtype not in PUT_DTYPES:
                raise ImageError(
                    ErrorCode.INVALID_ARGUMENT, f"Put tensors are {', '.join(PUT_DTYPES)}; got {out.dtype!r}"
                )
            try:
                out.to_tensor()  # the shape must match the byte count
            except ValueError as exc:
                raise ImageError(ErrorCode.INVALID_ARGUMENT, str(exc)) from None

    async def _digests(self, images: Sequence[ImageInput | ImageError]) -> list[bytes | ImageError]:
        """Each image's digest, or why it has none. Hashing reads every byte sent (a 256 MiB request
        takes 100+ ms), so unless the request is small it runs in a worker thread."""

        def digest_or_error(image: ImageInput | ImageError) -> bytes | ImageError:
            try:
                return image if isinstance(image, ImageError) else self._digest(image)
            except ImageError as exc:
                return exc

        if len(images) <= _IMAGES_PER_LOOP_TURN and self._hashed_bytes(images) <= (
            _INLINE_DIGEST_BYTES if self.config.digest_key is None else _INLINE_KEYED_DIGEST_BYTES
        ):
            return [digest_or_error(image) for image in images]
        return await asyncio.to_thread(lambda: [digest_or_error(image) for image in images])

    @staticmethod
    def _hashed_bytes(images: Sequence[ImageInput | ImageError]) -> float:
        """The bytes hashing ``images`` reads; infinite with a video (its digest also checks its sampling)."""
        total = 0
        for image in images:
            if isinstance(image, EncodedFile | PixelRows):
                total += len(image.data)
            elif isinstance(image, RawRGB):
                total += len(image.rgb)
            elif isinstance(image, EncodedVideo | RawVideo):
                return math.inf
        return total

    def _answer_from_memory(
        self, index: int, image: ImageInput | ImageError, digest_or_error: bytes | ImageError, scope: Scope
    ) -> ImageOutcome | bytes:
        """The image's outcome if L1 or the input itself settles it, else its digest (to resolve)."""
        digest = b""
        try:
            if isinstance(digest_or_error, ImageError):
                raise digest_or_error
            digest = digest_or_error
            with self.observer.timed("l1_get"):
                entry = self.l1.get(l1_key(digest, scope.tenant))
            self.observer.cache_lookup("l1", hit=entry is not None)
            if entry is None:
                return digest
            self.stats.l1_hits += 1
            return ImageOutcome(index, digest, entry, Source.L1)
        except ImageError as exc:
            return self._failed(index, digest, exc, video=isinstance(image, EncodedVideo | RawVideo))

    async def _serve_miss(self, index: int, image: ImageInput, digest: bytes, scope: Scope) -> ImageOutcome:
        try:
            if isinstance(image, DigestOnly):
                entry = await self._from_l2(digest, scope.tenant)
                if entry is None:
                    self.stats.not_found += 1
                    raise ImageError(ErrorCode.NOT_FOUND, f"digest {digest.hex()} is not cached; send the image")
                self.stats.l2_hits += 1
                return ImageOutcome(index, digest, entry, Source.L2)
            entry, source = await self._resolve_once(digest, image, scope)
            return ImageOutcome(index, digest, entry, source, cached=not self._too_large_to_cache(entry))
        except ImageError as exc:
            return self._failed(index, digest, exc, video=isinstance(image, EncodedVideo | RawVideo))

    def _failed(self, index: int, digest: bytes, exc: ImageError, video: bool = False) -> ImageOutcome:
        if exc.code is not ErrorCode.NOT_FOUND:
            self.stats.errors += 1
        return ImageOutcome(index, digest, error=exc, video_input=video)

    def _digest(self, image: ImageInput) -> bytes:
        if isinstance(image, DigestOnly):
            if len(image.digest) != DIGEST_SIZE:
                raise ImageError(
                    ErrorCode.INVALID_ARGUMENT, f"digest must be {DIGEST_SIZE} bytes, got {len(image.digest)}"
                )
            return image.digest
        key = self.config.digest_key
        if isinstance(image, EncodedFile):
            if len(image.data) > self.config.limits.max_image_bytes:
                raise ImageError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"image of {len(image.data)} bytes is over the limit of {self.config.limits.max_image_bytes}",
                )
            return digest_file(image.data, key)
        if isinstance(image, RawRGB):
            return digest_rgb(image.rgb, image.height, image.width, key)
        if isinstance(image, EncodedVideo | RawVideo):
            return self._video_digest(image)
        return digest_pixels(image.data, image.grid_thw, image.dtype, image.row_width, key)

    def _video_digest(self, video: EncodedVideo | RawVideo) -> bytes:
        video.sampling.check()
        key, sampling = self.config.digest_key, video.sampling.header()
        if isinstance(video, RawVideo):
            return digest_video_frames(
                video.rgb, video.frames, video.height, video.width, video.timestamps, sampling, key
            )
        limit = self.config.limits.max_video_bytes
        if len(video.data) > limit:
            raise ImageError(ErrorCode.INVALID_ARGUMENT, f"video of {len(video.data)} bytes is over the limit {limit}")
        return digest_video_file(video.data, sampling, key)

    def _too_large_to_cache(self, entry: CachedEmbedding) -> bool:
        """A video entry over ``max_cached_video_bytes``: computed and returned, never stored (a long
        clip would evict thousands of images from L1 and make a Redis value of gigabytes)."""
        return entry.video is not None and entry.nbytes > self.config.limits.max_cached_video_bytes

    async def _from_l2(self, digest: bytes, tenant: str) -> CachedEmbedding | None:
        if self.l2 is None:
            return None
        return await self._from_l2_at(l1_key(digest, tenant), self.l2.key(digest, tenant))

    async def _from_l2_at(self, l1_at: Hashable, l2_at: bytes) -> CachedEmbedding | None:
        """The entry at Redis key ``l2_at``, kept in L1 at ``l1_at`` when found."""
        assert self.l2 is not None
        with self.observer.timed("l2_get"):
            entry = await self.l2.get_at(l2_at)
        self.observer.cache_lookup("l2", hit=entry is not None)
        if entry is not None:
            with self.observer.timed("l1_put"):
                return self.l1.put(l1_at, entry) or entry
        return entry

    async def _resolve_once(self, digest: bytes, image: ImageInput, scope: Scope) -> tuple[CachedEmbedding, Source]:
        key = l1_key(digest, scope.tenant)
        while True:
            task = self._inflight.get(key)
            if task is None or task.done():  # done: its result is in L1, or it failed
                # This request looked in L1 before it got here; a computation may have finished since.
                entry = self.l1.get(key)
                if entry is not None:
                    self.stats.l1_hits += 1
                    return entry, Source.L1
                self._check_not_failed(key)
                if len(self._inflight) >= self.config.limits.max_queued_images:
                    self.stats.overloaded += 1
                    raise ImageError(
                        ErrorCode.RESOURCE_EXHAUSTED,
                        f"server overloaded: {len(self._inflight)} images queued (--max-queued-images)",
                    )
                task = asyncio.ensure_future(self._resolve(digest, image, scope))
                self._inflight[key] = task
                task.add_done_callback(self._forget_inflight(key))
            else:
                self.stats.single_flight_joins += 1
            try:
                # shield: a cancelled request must not cancel the computation others wait on.
                entry, source = await asyncio.shield(task)
                break
            except ImageError as exc:
                # Joined a computation whose (earlier) deadline passed: try again under ours, if any.
                if exc.code is not ErrorCode.DEADLINE_EXCEEDED:
                    raise
                scope.check_deadline()
        if source is Source.L2:
            self.stats.l2_hits += 1
        else:
            self.stats.misses += 1
        return entry, source

    def _forget_inflight(self, key: bytes) -> Callable[[asyncio.Future], None]:
        def forget(task: asyncio.Future) -> None:
            if self._inflight.get(key) is task:  # a retry may already have put a newer one
                del self._inflight[key]
            if not task.cancelled():
                # Its waiters await it through shield(), which stops watching once they are cancelled: its
                # error, if every waiter has gone, is retrieved here rather than logged as never retrieved.
                task.exception()

        return forget

    async def _resolve(self, digest: bytes, image: ImageInput, scope: Scope) -> tuple[CachedEmbedding, Source]:
        entry = await self._from_l2(digest, scope.tenant)
        if entry is not None:
            return entry, Source.L2
        token = ""
        if self.fleet_lock is not None:
            claim = await self.fleet_lock.claim(digest, scope.tenant)
            if isinstance(claim, CachedEmbedding):  # another replica computed it meanwhile
                return self.l1.put(l1_key(digest, scope.tenant), claim) or claim, Source.L2
            _, token = claim
        try:
            assert not isinstance(image, DigestOnly)  # _serve_miss answers those from L2 alone
            entry = await self.pipeline.compute(image, scope)
        except BaseException as exc:
            if isinstance(exc, ImageError) and exc.code is ErrorCode.DEADLINE_EXCEEDED:
                self.stats.deadline_expired += 1
            if isinstance(exc, ImageError) and exc.code is ErrorCode.INTERNAL:
                self._remember_failure(l1_key(digest, scope.tenant), exc)
            self._release_unstored(digest, scope.tenant, token)
            raise
        if self._too_large_to_cache(entry):
            self._release_unstored(digest, scope.tenant, token)
            return entry, Source.COMPUTED
        with self.observer.timed("l1_put"):
            held = self.l1.put(l1_key(digest, scope.tenant), entry)
        if self.l2 is not None:
            self._background(self._store(digest, scope.tenant, entry, token))
        return held or entry, Source.COMPUTED

    def _release_unstored(self, digest: bytes, tenant: str, token: str) -> None:
        """Releases the fleet lock (if held) of a computation that stores nothing."""
        if token:
            self._background(self._store(digest, tenant, None, token))

    def _remember_failure(self, key: bytes, error: ImageError) -> None:
        self._failed_images[key] = (time.monotonic() + FAILED_IMAGE_TTL_S, error)
        self._failed_images.move_to_end(key)
        while len(self._failed_images) > FAILED_IMAGE_MEMORY:
            self._failed_images.popitem(last=False)

    def _check_not_failed(self, key: bytes) -> None:
        """Raises the INTERNAL error an earlier computation of this image ended in, while it is remembered."""
        failed = self._failed_images.get(key)
        if failed is None:
            return
        until, error = failed
        if time.monotonic() >= until:
            del self._failed_images[key]
            return
        raise ImageError(error.code, f"{error.message} (an earlier try; not computed again for a while)")

    async def _store(self, digest: bytes, tenant: str, entry: CachedEmbedding | None, lock_token: str) -> None:
        """Writes a computed entry to L2, then releases the fleet lock (if held) so waiters find it."""
        assert self.l2 is not None
        if entry is not None:
            with self.observer.timed("l2_put"):
                await self.l2.put(digest, entry, tenant)
        if lock_token and self.fleet_lock is not None:
            await self.fleet_lock.release(digest, tenant, lock_token)

    def _background(self, coro: Coroutine[None, None, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._l2_writes.add(task)
        task.add_done_callback(self._l2_writes.discard)
