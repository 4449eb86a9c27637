"""The engine's numbers as plain data: what GetStats, /api/stats and /metrics read.

Apart from the engine and the encoders that count them, so that a gRPC front-end process (``--frontends``),
which receives them over the link, needs neither torch nor the model code to read them.
"""

from __future__ import annotations

import time
from dataclasses import astuple, dataclass, field, fields

from vitcache.errors import ErrorCode
from vitcache.outcomes import ImageOutcome, Source


@dataclass
class BatcherStats:
    batches: int = 0
    images: int = 0
    patches: int = 0
    oom_splits: int = 0
    device_seconds: float = 0.0  # GPU time of forwards and their copies to the host (busy fraction)
    decoded_pixels_peak: int = 0  # most decoded pixels in flight at once (the pipeline's PixelBudget)

    def __add__(self, other: BatcherStats) -> BatcherStats:
        """Two encoders' (or two processes' of one device) stats as one: counts add, peaks take the larger."""
        return BatcherStats(
            *(
                max(a, b) if f.name.endswith("_peak") else a + b
                for f, a, b in zip(fields(self), astuple(self), astuple(other), strict=True)
            )
        )


@dataclass
class EncoderStatus:
    """One device's encoder, as stats show it."""

    device: str
    alive: bool
    stats: BatcherStats
    memory: dict[str, int] = field(default_factory=dict)  # allocated and reserved bytes (CUDA only)
    in_flight: int = 0  # images sent to it and not answered (encoder pools)
    restarts: int = 0  # times its process was started again after dying (encoder pools)


@dataclass
class EngineStats:
    l1_hits: int = 0
    l2_hits: int = 0
    misses: int = 0
    not_found: int = 0
    errors: int = 0
    single_flight_joins: int = 0
    overloaded: int = 0  # images refused because max_queued_images were already queued
    deadline_expired: int = 0  # misses dropped before their forward because the deadline passed
    puts: int = 0  # entries stored by Put
    started_at: float = field(default_factory=time.monotonic)


@dataclass
class OutcomeCounts:
    """Outcomes by source or error: what a tenant's ``GetStats`` shows, and the clips among all outcomes."""

    l1_hits: int = 0
    l2_hits: int = 0
    misses: int = 0  # computed (alone or in a single flight joined)
    not_found: int = 0  # digest-only lookups that found nothing
    errors: int = 0  # answered with an error other than NOT_FOUND
    overloaded: int = 0  # of the errors, RESOURCE_EXHAUSTED
    deadline_expired: int = 0  # of the errors, DEADLINE_EXCEEDED

    def count(self, outcome: ImageOutcome) -> None:
        if outcome.error is None:
            if outcome.source is Source.L1:
                self.l1_hits += 1
            elif outcome.source is Source.L2:
                self.l2_hits += 1
            else:
                self.misses += 1
        elif outcome.error.code is ErrorCode.NOT_FOUND:
            self.not_found += 1
        else:
            self.errors += 1
            self.overloaded += outcome.error.code is ErrorCode.RESOURCE_EXHAUSTED
            self.deadline_expired += outcome.error.code is ErrorCode.DEADLINE_EXCEEDED


@dataclass
class TenantStats(OutcomeCounts):
    """One tenant's outcomes: what its own ``GetStats`` may show under authentication."""

    puts: int = 0  # entries it stored by Put


@dataclass
class VideoStats(OutcomeCounts):
    """The clips among all outcomes (``EngineStats`` counts them with the images)."""

    tokens: int = 0  # embedding rows (merged tokens) of the clips answered

    def count(self, outcome: ImageOutcome) -> None:
        super().count(outcome)
        if outcome.entry is not None:
            self.tokens += outcome.entry.outputs[0].shape[0]


@dataclass(frozen=True)
class ModelSnapshot:
    """The served model, as stats and metrics name it."""

    model: str
    family: str
    dtype: str
    device: str
    namespace: str


@dataclass(frozen=True)
class L1Snapshot:
    entries: int
    bytes_used: int
    capacity_bytes: int
    evictions: int


@dataclass(frozen=True)
class L2Snapshot:
    enabled: bool  # an L2 (Redis) is configured
    connected: bool  # the last Redis call succeeded
    errors: int  # Redis calls that failed or timed out
    corrupt: int  # values rejected by the header or checksum check
    fleet_lock_waits: int  # misses that waited on another replica's computation


@dataclass(frozen=True)
class EngineSnapshot:
    """Every number of the engine at one moment, copied: what GetStats, /api/stats and /metrics read."""

    uptime_s: float
    model: ModelSnapshot
    images: EngineStats  # images and clips by source and outcome, engine-wide
    videos: VideoStats  # the clips among them
    l1: L1Snapshot
    l2: L2Snapshot
    batcher: BatcherStats  # every encoder's forwards together
    encoders: list[EncoderStatus]  # per device
    tenants: dict[str, TenantStats]  # per tenant, when counted (count_by_tenant)
