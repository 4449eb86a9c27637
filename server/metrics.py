"""Prometheus metrics of one server (``/metrics`` on ``--metrics-port``).

Three sources, one registry:
- :class:`ServerMetrics` is the engine's :class:`~vitcache.observer.EngineObserver`: images by
  source and status code, digest-only lookups that found nothing, cache lookups by tier, stage
  latencies, batch sizes.
- :class:`RequestMetricsInterceptor` counts the VitCache RPCs by method and status code, times
  them and tracks those in flight.
- :class:`EngineStateCollector` reads the engine's :meth:`~vitcache.engine.EmbeddingEngine.snapshot`
  at scrape time (L1 fill, Redis state and errors, GPU memory), as GetStats does.

Names follow Prometheus conventions: ``vitcache_`` prefix, base units in the name (seconds,
bytes), counters end in ``_total``. Each server has its own registry, so servers sharing a
process (tests) never share counters.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Protocol, get_args

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from vitcache.errors import ErrorCode
from vitcache.observer import EngineObserver, Stage, Tier
from vitcache.outcomes import ImageOutcome
from vitcache.stats import EncoderStatus

if TYPE_CHECKING:
    from vitcache.engine import EmbeddingEngine

#: 5 µs (an L1 hit) to 30 s (a large forward on a busy device).
LATENCY_BUCKETS = (
    *(5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3),
    *(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
BATCH_IMAGES_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
BATCH_PATCHES_BUCKETS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
#: ImageResult.source of a success, lower case; "none" for an error.
SOURCES = ("l1", "l2", "computed")
#: The ``kind`` label of vitcache_images_total, by ImageOutcome.is_video.
KINDS = {False: "image", True: "video"}
#: Exported per CUDA device (label ``gpu``): name -> (help, key of EncoderStatus.memory).
GPU_METRICS = {
    "vitcache_gpu_memory_allocated_bytes": ("Device memory held by tensors", "allocated"),
    "vitcache_gpu_memory_reserved_bytes": ("Device memory reserved by the caching allocator", "reserved"),
}


class ServerMetrics(EngineObserver):
    """The metrics registry of one server and the engine observer that feeds it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        r = self.registry
        # Clips are a kind of these, not a counter of their own: sums over kinds stay every item answered.
        self.images = Counter(
            "vitcache_images",
            "Images and clips answered, by where the embedding came from (none on error), status code and kind "
            "(image, video); a digest-only lookup that found nothing is vitcache_lookups_not_found_total",
            ["source", "code", "kind"],
            registry=r,
        )
        # A digest-only lookup that finds nothing (hash-first round, Fetch) is a normal step of a miss,
        # not an image answered and not an error: the client sends the image next (or has none cached).
        self.lookups_not_found = Counter(
            "vitcache_lookups_not_found",
            "Digest-only lookups (hash-first rounds, Fetch) that found nothing cached: not errors, not images",
            registry=r,
        )
        self.cache_lookups = Counter(
            "vitcache_cache_lookups", "Digest lookups in a cache tier, by result", ["tier", "result"], registry=r
        )
        self.stage_duration = Histogram(
            "vitcache_stage_duration_seconds",
            "Time in one stage: queue, preprocess, forward (per batch), l1/l2 get and put",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_images = Histogram(
            "vitcache_batch_size_images", "Images per vision forward", buckets=BATCH_IMAGES_BUCKETS, registry=r
        )
        self.batch_patches = Histogram(
            "vitcache_batch_size_patches", "Patches per vision forward", buckets=BATCH_PATCHES_BUCKETS, registry=r
        )
        self.requests = Counter(
            "vitcache_requests", "VitCache RPCs by method and final status code", ["method", "code"], registry=r
        )
        self.request_duration = Histogram(
            "vitcache_request_duration_seconds",
            "Whole-RPC time, first byte in to last result out",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests_in_flight = Gauge(
            "vitcache_requests_in_flight", "VitCache RPCs being served", ["method"], registry=r
        )
        # Children made up front: the hot path skips the label lookup, and every series
        # exists (at 0) from the first scrape, so dashboards and rate() see it at once.
        self._stages = {stage: self.stage_duration.labels(stage) for stage in get_args(Stage)}
        self._lookups = {
            (tier, hit): self.cache_lookups.labels(tier, "hit" if hit else "miss")
            for tier in get_args(Tier)
            for hit in (True, False)
        }
        self._methods: dict[str, MethodMetrics] = {}
        self._served = {
            (source, is_video): self.images.labels(source, "OK", KINDS[is_video])
            for source in SOURCES
            for is_video in (False, True)
        }

    def watch(self, engine: EmbeddingEngine) -> None:
        """Adds the engine's state (read at each scrape) to the registry."""
        self.registry.register(EngineStateCollector(engine))

    def interceptor(self, service_name: str) -> RequestMetricsInterceptor:
        """Observes the RPCs of ``service_name`` (e.g. ``vitcache.v1.VitCache``)."""
        return RequestMetricsInterceptor(self.method, service_name)

    def method(self, name: str) -> MethodMetrics:
        """The metric children of RPC method ``name``, made on its first call."""
        recorder = self._methods.get(name)
        if recorder is None:
            recorder = self._methods[name] = MethodMetrics(self, name)
        return recorder

    def record_forwarded(self, events: list[tuple[str, str | None, float]]) -> None:
        """RPC events of a front-end process (``--frontends``): ``(method, None, 0)`` when one starts,
        ``(method, code name, seconds)`` when it ends."""
        for method, code, seconds in events:
            if code is None:
                self.method(method).started()
            else:
                self.method(method).finished(code, seconds)

    def forwarded_abandoned(self, method: str, count: int) -> None:
        """``count`` RPCs of ``method`` in flight in a front-end that is gone: no longer in flight."""
        self.method(method).in_flight.dec(count)

    # EngineObserver: called from the event loop and worker threads; prometheus_client is thread-safe.

    def stage_timed(self, stage: Stage, seconds: float) -> None:
        self._stages[stage].observe(seconds)

    def cache_lookup(self, tier: Tier, hit: bool) -> None:
        self._lookups[tier, hit].inc()

    def forward_done(self, images: int, patches: int) -> None:
        self.batch_images.observe(images)
        self.batch_patches.observe(patches)

    def image_done(self, outcome: ImageOutcome) -> None:
        if outcome.error is not None and outcome.error.code is ErrorCode.NOT_FOUND:
            self.lookups_not_found.inc()
        elif outcome.error is not None:
            self.images.labels("none", outcome.error.code.name, KINDS[outcome.is_video]).inc()
        elif outcome.source is not None:
            self._served[outcome.source.name.lower(), outcome.is_video].inc()


class RequestMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts, times and tracks in flight every RPC of the VitCache service (not health or reflection).
    Each method's observing handler and metric children are made on its first call, not on every call."""

    def __init__(self, recorder: Callable[[str], MethodRecorder], service_name: str) -> None:
        self._recorder = recorder
        self._prefix = f"/{service_name}/"
        self._observing: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        full_name = handler_call_details.method
        if handler is None or not full_name.startswith(self._prefix):
            return handler
        known = self._observing.get(full_name)
        if known is None or known[0] is not handler:  # a refusal is a handler of its own call
            method = self._recorder(full_name.removeprefix(self._prefix))
            known = self._observing[full_name] = (handler, self._observe(method, handler))
        return known[1]

    def _observe(self, method: MethodRecorder, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.unary_stream is not None:
            behavior = self._stream(method, handler.unary_stream)
            return grpc.unary_stream_rpc_method_handler(
                behavior, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_unary is not None:
            behavior = self._unary(method, handler.unary_unary)
            return grpc.unary_unary_rpc_method_handler(
                behavior, handler.request_deserializer, handler.response_serializer
            )
        return handler

    def _stream(
        self, method: MethodRecorder, behavior: Callable[..., AsyncIterator[Any]]
    ) -> Callable[..., AsyncIterator[Any]]:
        async def observed(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            with _RequestTimer(method, context):
                async for response in behavior(request, context):
                    yield response

        return observed

    def _unary(self, method: MethodRecorder, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with _RequestTimer(method, context):
                return await behavior(request, context)

        return observed


class MethodRecorder(Protocol):
    """Where one method's RPCs are counted: this process's registry, or a front-end's link to the engine's."""

    def started(self) -> None: ...

    def finished(self, code: str, seconds: float) -> None: ...


class MethodMetrics:
    """One method's metric children, looked up once: ``labels()`` takes a lock and builds a key each call."""

    def __init__(self, metrics: ServerMetrics, method: str) -> None:
        self.in_flight = metrics.requests_in_flight.labels(method)
        self.duration = metrics.request_duration.labels(method)
        self._requests, self._method = metrics.requests, method
        self._by_code: dict[str, Counter] = {}

    def started(self) -> None:
        self.in_flight.inc()

    def finished(self, code: str, seconds: float) -> None:
        self.in_flight.dec()
        self.duration.observe(seconds)
        counter = self._by_code.get(code)
        if counter is None:
            counter = self._by_code[code] = self._requests.labels(self._method, code)
        counter.inc()


class _RequestTimer:
    """In flight while open; on close, the RPC's duration and final code (from ``context`` on abort)."""

    def __init__(self, method: MethodRecorder, context: grpc.aio.ServicerContext) -> None:
        self._method, self._context = method, context
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = time.perf_counter()
        self._method.started()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is None:
            code = grpc.StatusCode.OK
        elif issubclass(exc_type, (asyncio.CancelledError, GeneratorExit)):
            code = grpc.StatusCode.CANCELLED
        else:
            code = self._context.code() or grpc.StatusCode.UNKNOWN
        self._method.finished(code.name, time.perf_counter() - self._start)


class EngineStateCollector(Collector):
    """The engine's state, read at scrape time: L1 fill, Redis state and errors, GPU memory.

    GPU memory is reported only when the encoder is on a CUDA device, as its pipeline reads it
    (in the encoder process, if there is one); this process never touches ``torch.cuda``.
    """

    def __init__(self, engine: EmbeddingEngine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        snapshot = self._engine.snapshot()
        l1, l2 = snapshot.l1, snapshot.l2
        yield InfoMetricFamily("vitcache_model", "The served model", value=asdict(snapshot.model))
        yield GaugeMetricFamily("vitcache_l1_bytes", "Payload bytes held in L1", value=l1.bytes_used)
        yield GaugeMetricFamily(
            "vitcache_l1_capacity_bytes", "L1 payload capacity (--l1-bytes)", value=l1.capacity_bytes
        )
        yield GaugeMetricFamily("vitcache_l1_entries", "Images held in L1", value=l1.entries)
        yield CounterMetricFamily("vitcache_l1_evictions", "Entries evicted from L1 to make room", value=l1.evictions)
        yield GaugeMetricFamily("vitcache_redis_enabled", "1 if an L2 (--redis-url) is configured", value=l2.enabled)
        yield GaugeMetricFamily("vitcache_redis_connected", "1 if the last Redis call succeeded", value=l2.connected)
        yield CounterMetricFamily("vitcache_redis_errors", "Redis calls that failed or timed out", value=l2.errors)
        yield CounterMetricFamily(
            "vitcache_redis_corrupt_entries", "Redis values rejected by the header or checksum check", value=l2.corrupt
        )
        yield CounterMetricFamily(
            "vitcache_single_flight_joins",
            "Images that waited on a computation of the same image already running",
            value=snapshot.images.single_flight_joins,
        )
        yield CounterMetricFamily(
            "vitcache_video_tokens",
            "Embedding rows (merged tokens) of the clips answered",
            value=snapshot.videos.tokens,
        )
        yield CounterMetricFamily(
            "vitcache_oom_splits",
            "Forwards split after running out of device memory",
            value=snapshot.batcher.oom_splits,
        )
        yield GaugeMetricFamily("vitcache_uptime_seconds", "Seconds since the engine started", value=snapshot.uptime_s)
        yield from _encoder_metrics(snapshot.encoders)


def _encoder_metrics(encoders: list[EncoderStatus]) -> Iterator[Metric]:
    """Per device (label ``gpu``; ``cpu`` for encoders on the CPU): liveness, work, busy time, memory."""
    families = {
        "alive": GaugeMetricFamily("vitcache_encoder_alive", "1 while the device's encoder runs", labels=["gpu"]),
        "restarts": CounterMetricFamily(
            "vitcache_encoder_restarts", "Times the device's encoder process died and was started again", labels=["gpu"]
        ),
        "batches": CounterMetricFamily("vitcache_encoder_forwards", "Forwards run on the device", labels=["gpu"]),
        "images": CounterMetricFamily("vitcache_encoder_images", "Images computed on the device", labels=["gpu"]),
        "device_seconds": CounterMetricFamily(
            "vitcache_encoder_device_seconds",
            "GPU seconds of forwards and their copies to the host; its rate is the device's busy fraction",
            labels=["gpu"],
        ),
    }
    memory = {name: GaugeMetricFamily(name, doc, labels=["gpu"]) for name, (doc, _) in GPU_METRICS.items()}
    for status in encoders:
        families["alive"].add_metric([status.device], status.alive)
        families["restarts"].add_metric([status.device], status.restarts)
        for field_name in ("batches", "images", "device_seconds"):
            families[field_name].add_metric([status.device], getattr(status.stats, field_name))
        for name, (_, key) in GPU_METRICS.items():
            if key in status.memory:
                memory[name].add_metric([status.device], status.memory[key])
    yield from families.values()
    yield from (family for family in memory.values() if family.samples)
