"""The dashboard's numbers (``/api/stats``, ``vitcache stats``), computed from the Prometheus registry.

Rates, hit ratios, latency percentiles and batch sizes are over a recent window: a sampler thread
records the counters and histograms every ``sample_interval_s`` into a ring that reaches
``max_window_s`` back, and a request compares the registry now with the sample nearest to a window
ago, the way ``rate()`` and ``histogram_quantile()`` would in Prometheus. The server samples on its
own rather than when polled, so ``?window=5`` covers the last 5 s however long ago the last poll
was, and the answer comes at once (a client sampling at both ends would have to wait the window).
Cumulative totals and gauges are as of now.

Hit ratios count images answered with an embedding: ``l1`` and ``l2`` are the shares served
from each tier, ``overall`` their sum; the rest were computed. A digest-only lookup that found
nothing (hash-first NOT_FOUND, a Fetch miss) is neither an image nor an error: it is counted apart
(``lookups_not_found``); the image comes back with its bytes and is counted then.
Video clips are counted with the images and again apart (``videos``: rate, hit ratio, total, tokens).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, get_args

from prometheus_client import CollectorRegistry

from vitcache.observer import Stage

from .metrics import SOURCES

#: The RPCs that carry images; GetStats and GetModelInfo are not traffic.
IMAGE_METHODS = ("Encode", "Fetch")
QUANTILES = (0.5, 0.9, 0.95, 0.99)
_Labels = tuple[tuple[str, str], ...]

log = logging.getLogger(__name__)


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """Prometheus' ``histogram_quantile``: ``buckets`` are (upper bound, cumulative count), +Inf last.

    Linear within the bucket that holds the rank; a rank in the +Inf bucket gives the highest
    finite bound. None when there are no observations.
    """
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


@dataclass(frozen=True)
class _Snapshot:
    at: float  # time.monotonic()
    samples: Mapping[tuple[str, _Labels], float]

    @classmethod
    def take(cls, registry: CollectorRegistry, at: float, kinds: Container[str] | None = None) -> _Snapshot:
        """The samples of the registry's families of ``kinds`` (counter, histogram, ...; None: all)."""
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in registry.collect()
            if kinds is None or family.type in kinds
            for sample in family.samples
        }
        return cls(at, samples)

    def total(self, name: str, **match: str | Iterable[str]) -> float:
        """Sum of the samples called ``name`` whose labels match (a value, or any of several)."""
        return sum(
            value for (sample, labels), value in self.samples.items() if sample == name and _matches(labels, match)
        )

    def labels(self, name: str) -> dict[str, str]:
        """The labels of the first sample called ``name`` (for info metrics)."""
        return next((dict(labels) for (sample, labels), _ in self.samples.items() if sample == name), {})

    def buckets(self, name: str, **match: str | Iterable[str]) -> dict[float, float]:
        """Cumulative bucket counts of histogram ``name`` by upper bound, summed over the matching series."""
        out: dict[float, float] = {}
        for (sample, labels), value in self.samples.items():
            if sample == f"{name}_bucket" and _matches(labels, match):
                bound = float(dict(labels)["le"])
                out[bound] = out.get(bound, 0.0) + value
        return out


def _matches(labels: _Labels, match: Mapping[str, str | Iterable[str]]) -> bool:
    have = dict(labels)
    for key, want in match.items():
        allowed = (want,) if isinstance(want, str) else tuple(want)
        if have.get(key) not in allowed:
            return False
    return True


class _SampleRing:
    """The last ``capacity`` snapshots, oldest first. Values are packed in arrays over one shared table
    of series (a series first seen later is absent, i.e. 0, in older samples), so five minutes of
    samples of a few hundred series take about a megabyte."""

    def __init__(self, capacity: int) -> None:
        self._series: dict[tuple[str, _Labels], int] = {}
        self._samples: deque[tuple[float, array[float]]] = deque(maxlen=capacity)

    def add(self, snapshot: _Snapshot) -> None:
        values = array("d", bytes(8 * len(self._series)))
        for key, value in snapshot.samples.items():
            index = self._series.setdefault(key, len(self._series))
            if index == len(values):
                values.append(value)
            else:
                values[index] = value
        self._samples.append((snapshot.at, values))

    def nearest(self, at: float) -> _Snapshot:
        """The sample taken nearest to ``at`` (the oldest one when ``at`` is before it)."""
        taken, values = min(self._samples, key=lambda sample: abs(sample[0] - at))
        return _Snapshot(taken, dict(zip(self._series, values, strict=False)))


class StatsView:
    """Windowed and cumulative numbers of one server, from its registry. Thread-safe.

    :meth:`start` runs the sampler thread; without it (tests), :meth:`sample` records one sample.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        sample_interval_s: float = 1.0,
        max_window_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registry = registry
        self._sample_interval_s = sample_interval_s
        self._max_window_s = max_window_s
        self._clock = clock
        self._ring = _SampleRing(math.ceil(max_window_s / sample_interval_s) + 1)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._sampler: threading.Thread | None = None
        self.sample()

    def sample(self) -> None:
        """Records the counters and histograms as of now (gauges are read from the registry when asked)."""
        snapshot = _Snapshot.take(self._registry, self._clock(), kinds=("counter", "histogram"))
        with self._lock:
            self._ring.add(snapshot)

    def start(self) -> None:
        self._sampler = threading.Thread(target=self._sample_until_stopped, name="vitcache-stats", daemon=True)
        self._sampler.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._sampler is not None:
            self._sampler.join(timeout=5)

    def _sample_until_stopped(self) -> None:
        while not self._stopping.wait(self._sample_interval_s):
            try:
                self.sample()
            except Exception:  # a collector failing once must not end the windows for good
                log.exception("stats sampler: reading the metrics registry failed")

    def stats(self, window_s: float = 10.0) -> dict[str, Any]:
        """The numbers over the ``window_s`` seconds before now (within half a sample interval)."""
        window_s = min(max(window_s, self._sample_interval_s), self._max_window_s)
        now = _Snapshot.take(self._registry, self._clock())
        with self._lock:
            base = self._ring.nearest(now.at - window_s)
        return _compute(now, base)


def _compute(now: _Snapshot, base: _Snapshot) -> dict[str, Any]:
    seconds = max(now.at - base.at, 1e-9)

    def delta(name: str, **match: str | Iterable[str]) -> float:
        return now.total(name, **match) - base.total(name, **match)

    def quantiles_ms(name: str, **match: str | Iterable[str]) -> dict[str, float | None]:
        new, old = now.buckets(name, **match), base.buckets(name, **match)
        window = [(bound, count - old.get(bound, 0.0)) for bound, count in new.items()]
        return {f"p{round(q * 100)}": _ms(histogram_quantile(q, window)) for q in QUANTILES}

    served = {source: delta("vitcache_images_total", source=source) for source in SOURCES}
    served_total = {source: now.total("vitcache_images_total", source=source) for source in SOURCES}
    clips = {source: delta("vitcache_images_total", source=source, kind="video") for source in SOURCES}
    clips_total = {source: now.total("vitcache_images_total", source=source, kind="video") for source in SOURCES}
    forwards = delta("vitcache_batch_size_images_count")
    errors: dict[str, float] = {}  # by code, images and clips together
    for (name, labels), value in sorted(now.samples.items()):
        if name == "vitcache_images_total" and (labels_dict := dict(labels))["source"] == "none" and value > 0:
            errors[labels_dict["code"]] = errors.get(labels_dict["code"], 0.0) + value
    capacity = now.total("vitcache_l1_capacity_bytes")
    model = now.labels("vitcache_model_info")
    devices = [dict(labels)["gpu"] for (name, labels) in now.samples if name == "vitcache_encoder_alive"]
    gpus = [
        {
            "device": device,
            "alive": bool(now.total("vitcache_encoder_alive", gpu=device)),
            # Share of the window the device spent running forwards: near 1, it is the bottleneck.
            "busy_fraction": delta("vitcache_encoder_device_seconds_total", gpu=device) / seconds,
            "images_per_s": delta("vitcache_encoder_images_total", gpu=device) / seconds,
            "restarts": now.total("vitcache_encoder_restarts_total", gpu=device),
            "allocated_bytes": now.total("vitcache_gpu_memory_allocated_bytes", gpu=device),
            "reserved_bytes": now.total("vitcache_gpu_memory_reserved_bytes", gpu=device),
        }
        for device in devices
    ]
    gpu = {  # every GPU together; busy_fraction is their mean
        "allocated_bytes": now.total("vitcache_gpu_memory_allocated_bytes"),
        "reserved_bytes": now.total("vitcache_gpu_memory_reserved_bytes"),
        "busy_fraction": sum(g["busy_fraction"] for g in gpus) / len(gpus) if gpus else 0.0,
        "live": sum(g["alive"] for g in gpus),
    }
    return {
        "time": time.time(),
        "window_s": round(seconds, 3),
        "uptime_s": now.total("vitcache_uptime_seconds"),
        "model": model,
        "rates": {
            "requests_per_s": delta("vitcache_requests_total", method=IMAGE_METHODS) / seconds,
            "images_per_s": delta("vitcache_images_total") / seconds,
            "errors_per_s": delta("vitcache_images_total", source="none") / seconds,
            "lookups_not_found_per_s": delta("vitcache_lookups_not_found_total") / seconds,
            "forwards_per_s": forwards / seconds,
        },
        "hit_ratio": _hit_ratios(served),
        "latency_ms": {
            "request": quantiles_ms("vitcache_request_duration_seconds", method=IMAGE_METHODS),
            **{stage: quantiles_ms("vitcache_stage_duration_seconds", stage=stage) for stage in get_args(Stage)},
        },
        "batch": {
            "images_mean": delta("vitcache_batch_size_images_sum") / forwards if forwards else None,
            "patches_mean": delta("vitcache_batch_size_patches_sum") / forwards if forwards else None,
        },
        "totals": {
            "requests": now.total("vitcache_requests_total", method=IMAGE_METHODS),
            "images": now.total("vitcache_images_total"),
            **served_total,
            "forwards": now.total("vitcache_batch_size_images_count"),
            "lookups_not_found": now.total("vitcache_lookups_not_found_total"),
            "hit_ratio": _hit_ratios(served_total)["overall"],
        },
        "videos": {  # the clips among the images counted above
            "per_s": delta("vitcache_images_total", kind="video") / seconds,
            "hit_ratio": _hit_ratios(clips)["overall"],
            "total": now.total("vitcache_images_total", kind="video"),
            "hit_ratio_total": _hit_ratios(clips_total)["overall"],
            "tokens": now.total("vitcache_video_tokens_total"),
        },
        "errors_by_code": errors,
        "requests_in_flight": now.total("vitcache_requests_in_flight", method=IMAGE_METHODS),
        "l1": {
            "bytes": now.total("vitcache_l1_bytes"),
            "capacity_bytes": capacity,
            "entries": now.total("vitcache_l1_entries"),
            "evictions": now.total("vitcache_l1_evictions_total"),
            "fill": now.total("vitcache_l1_bytes") / capacity if capacity else None,
        },
        "redis": {
            "enabled": bool(now.total("vitcache_redis_enabled")),
            "connected": bool(now.total("vitcache_redis_connected")),
            "errors": now.total("vitcache_redis_errors_total"),
            "corrupt_entries": now.total("vitcache_redis_corrupt_entries_total"),
        },
        "gpu": gpu if model.get("device", "").startswith("cuda") else None,
        "gpus": gpus,
    }


def _hit_ratios(served: Mapping[str, float]) -> dict[str, float | None]:
    total = sum(served.values())
    if not total:
        return {"overall": None, "l1": None, "l2": None}
    return {"overall": (served["l1"] + served["l2"]) / total, "l1": served["l1"] / total, "l2": served["l2"] / total}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3
