"""A client of several replicas: each image goes to one replica, chosen by its digest.

Rendezvous (highest-random-weight) hashing ranks the replicas per digest, so every client
sends a given image to the same replica, which then holds it in its L1; adding or removing
a replica moves only the images it wins or held. A replica that answers UNAVAILABLE or CANCELLED
(down, killed mid-call, or draining), or fails images with UNAVAILABLE (it cannot compute), is
skipped for a backoff and probed with the health service before it is used again; its images
go to their next replica in the same request, so a replica failure fails no request while
another replica is up.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc
import xxhash
from grpc_health.v1 import health_pb2, health_pb2_grpc
from vitcache.v1 import vitcache_pb2 as pb

from .client import (
    EncodedImage,
    ImageFailed,
    ImageLike,
    PutItems,
    VitCacheClient,
    _as_input,
    _failed_with,
    put_pairs,
)
from .connect import ConnectOptions

R = TypeVar("R")
_SERVICE = "vitcache.v1.VitCache"
# What a replica that is down, killed mid-call or shutting down answers (a server in its shutdown
# grace cancels calls that arrive). This client never cancels a call itself, so neither code can
# come from the caller; other codes (INVALID_ARGUMENT, UNAUTHENTICATED, ...) would recur anywhere.
_REPLICA_FAILED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


def rendezvous_order(digest: bytes, targets: Sequence[str]) -> list[int]:
    """Indices of ``targets``, the replica that should hold ``digest`` first."""
    scores = [xxhash.xxh3_64_intdigest(target.encode() + b"\0" + digest) for target in targets]
    return sorted(range(len(targets)), key=lambda i: (-scores[i], targets[i]))


class _Replica:
    """One replica and whether to route to it. Thread-safe."""

    def __init__(
        self, target: str, max_message_bytes: int, options: ConnectOptions, min_backoff_s: float, max_backoff_s: float
    ) -> None:
        self.target = target
        self.client = VitCacheClient(target, max_message_bytes, options)
        self._health = health_pb2_grpc.HealthStub(self.client._channel)
        self._min_backoff_s = min_backoff_s
        self._max_backoff_s = max_backoff_s
        self._backoff_s = 0.0
        self._down_until = 0.0
        self._lock = threading.Lock()

    def mark_down(self) -> None:
        with self._lock:
            self._backoff_s = min(self._max_backoff_s, max(self._min_backoff_s, self._backoff_s * 2))
            self._down_until = time.monotonic() + self._backoff_s

    def usable(self) -> bool:
        """Up, or down but past its backoff and SERVING again when asked."""
        with self._lock:
            if self._backoff_s == 0.0:
                return True
            if time.monotonic() < self._down_until:
                return False
        try:
            answer = self._health.Check(health_pb2.HealthCheckRequest(service=_SERVICE), timeout=self._min_backoff_s)
            serving = answer.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            serving = False
        if not serving:
            self.mark_down()
            return False
        with self._lock:
            self._backoff_s = 0.0
        return True


def _reindexed(result: EncodedImage, index: int) -> EncodedImage:
    error = result.error and ImageFailed(index, result.error.code, result.error.message)
    return dataclasses.replace(result, index=index, error=error)


def _result_unavailable(result: EncodedImage) -> bool:
    return _failed_with(result, grpc.StatusCode.UNAVAILABLE)


def _unavailable(index: int, digest: bytes) -> EncodedImage:
    failed = ImageFailed(index, grpc.StatusCode.UNAVAILABLE, "every replica failed this image")
    return EncodedImage(index, digest, [], (), "", failed)


def _key_route(key: str) -> bytes:
    """What a Put key is routed by: never equal to a 16-byte digest."""
    return b"put\0" + key.encode()


class FleetClient:
    """Blocking client of several replicas sharing one L2 (:class:`VitCacheClient`'s encode, fetch and put).

    Invariants:
    - An image (a digest, a Put key) is sent to the first replica of its rendezvous order that is
      usable and has not failed it in this request; replicas are tried at most once per item.
    - The sub-requests of one call run concurrently, one per replica.
    - An image fails with UNAVAILABLE only when every replica failed it.
    """

    def __init__(
        self,
        targets: Sequence[str],
        max_message_bytes: int = 256 << 20,
        options: ConnectOptions | None = None,
        min_backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
    ) -> None:
        if not targets:
            raise ValueError("FleetClient needs at least one target")
        self.options = options or ConnectOptions()
        self.targets = list(targets)
        self._replicas = [
            _Replica(t, max_message_bytes, self.options, min_backoff_s, max_backoff_s) for t in self.targets
        ]
        self._pool = ThreadPoolExecutor(len(self.targets), thread_name_prefix="vitcache-fleet")

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for replica in self._replicas:
            replica.client.close()

    def __enter__(self) -> FleetClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _route(self, order: list[int], tried: set[int]) -> int | None:
        untried = [i for i in order if i not in tried]
        for i in untried:
            if self._replicas[i].usable():
                return i
        return untried[0] if untried else None  # all look down: try the best one anyway

    def encode(self, images: Sequence[ImageLike], timeout: float | None = None) -> list[EncodedImage]:
        """Embeddings of ``images`` in input order; a failed image carries ``error``."""
        inputs = [_as_input(image, self.options.digest_key) for image in images]

        def send(client: VitCacheClient, items: list[int]) -> list[EncodedImage]:
            return client._exchange([inputs[i] for i in items], timeout)

        routes = [digest for digest, _ in inputs]
        return self._spread(routes, send, _result_unavailable, _reindexed, lambda i: _unavailable(i, routes[i]))

    def fetch(
        self,
        digests: Sequence[bytes] = (),
        timeout: float | None = None,
        *,
        keys: Sequence[str] = (),
        metadata_only: bool = False,
    ) -> list[EncodedImage]:
        """``VitCacheClient.fetch`` over the fleet: each digest or key asked of the replica that should
        hold it in L1 (any replica reads the shared L2); results index digests first, then keys."""
        count = len(digests)

        def send(client: VitCacheClient, items: list[int]) -> list[EncodedImage]:
            asked_digests, asked_keys = [i for i in items if i < count], [i for i in items if i >= count]
            answers = client.fetch(
                [digests[i] for i in asked_digests],
                timeout,
                keys=[keys[i - count] for i in asked_keys],
                metadata_only=metadata_only,
            )
            by_item = dict(zip(asked_digests + asked_keys, sorted(answers, key=lambda r: r.index), strict=True))
            return [by_item[i] for i in items]

        routes = [*digests, *(_key_route(key) for key in keys)]
        return self._spread(
            routes, send, _result_unavailable, _reindexed, lambda i: _unavailable(i, digests[i] if i < count else b"")
        )

    def put(
        self, items: PutItems, grid_thws: Sequence[Sequence[int]] | None = None, timeout: float | None = None
    ) -> list[ImageFailed | None]:
        """``VitCacheClient.put`` over the fleet: each item stored through the replica that should hold it."""
        pairs = put_pairs(items)

        def send(client: VitCacheClient, chosen: list[int]) -> list[ImageFailed | None]:
            grids = None if grid_thws is None else [grid_thws[i] for i in chosen]
            return client.put([pairs[i] for i in chosen], grids, timeout)

        def failed(error: ImageFailed | None) -> bool:
            return error is not None and error.code is grpc.StatusCode.UNAVAILABLE

        def reindexed(error: ImageFailed | None, index: int) -> ImageFailed | None:
            return error and ImageFailed(index, error.code, error.message)

        def unavailable(index: int) -> ImageFailed:
            return ImageFailed(index, grpc.StatusCode.UNAVAILABLE, "every replica failed this item")

        return self._spread([_key_route(key) for key, _ in pairs], send, failed, reindexed, unavailable)

    def _spread(
        self,
        routes: Sequence[bytes],
        send: Callable[[VitCacheClient, list[int]], list[R]],
        failed: Callable[[R], bool],
        reindexed: Callable[[R, int], R],
        unavailable: Callable[[int], R],
    ) -> list[R]:
        """Sends each item to its replica (by ``routes[i]``'s rendezvous order), one call per replica,
        concurrently; an item its replica could not serve (the call failed, or ``failed`` says so of
        its answer) goes to its next replica in a further round."""
        orders = [rendezvous_order(route, self.targets) for route in routes]
        tried: list[set[int]] = [set() for _ in routes]
        results: list[R | None] = [None] * len(routes)
        pending = list(range(len(routes)))
        for _ in range(len(self._replicas)):  # every round takes one replica off each pending item
            groups: dict[int, list[int]] = {}
            for i in pending:
                replica = self._route(orders[i], tried[i])
                if replica is None:
                    results[i] = unavailable(i)
                else:
                    groups.setdefault(replica, []).append(i)
            if len(groups) == 1:  # one replica: no thread hop
                answers = {r: self._send(r, send, idx) for r, idx in groups.items()}
            else:
                calls = {r: self._pool.submit(self._send, r, send, idx) for r, idx in groups.items()}
                answers = {r: call.result() for r, call in calls.items()}
            pending = []
            for r, answered in answers.items():
                if answered is None:
                    self._replicas[r].mark_down()
                    for i in groups[r]:
                        tried[i].add(r)
                    pending.extend(groups[r])
                    continue
                replica_failed = False
                for i, result in zip(groups[r], answered, strict=True):
                    if failed(result):  # e.g. its encoder process died
                        replica_failed = True
                        tried[i].add(r)
                        pending.append(i)
                    else:
                        results[i] = reindexed(result, i)
                if replica_failed:
                    self._replicas[r].mark_down()
            if not pending:
                break
        for i in pending:
            results[i] = unavailable(i)
        return results  # type: ignore[return-value]

    def _send(
        self, replica: int, send: Callable[[VitCacheClient, list[int]], list[R]], items: list[int]
    ) -> list[R] | None:
        """The replica's answers; None if it is unavailable (other errors propagate)."""
        try:
            return send(self._replicas[replica].client, items)
        except grpc.RpcError as exc:
            if exc.code() not in _REPLICA_FAILED:  # type: ignore[attr-defined]
                raise
            return None

    def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        """The served model, from the first replica that answers (every replica serves the same one)."""
        for replica in self._replicas:
            try:
                return replica.client.model_info(timeout=timeout)
            except grpc.RpcError as exc:
                if exc.code() not in _REPLICA_FAILED:  # type: ignore[attr-defined]
                    raise
                last = exc
        raise last

    def stats(self, timeout: float | None = None) -> dict[str, pb.Stats]:
        """Each replica's counters, by target (replicas that do not answer are left out)."""
        answers = {}
        for replica in self._replicas:
            try:
                answers[replica.target] = replica.client.stats(timeout=timeout)
            except grpc.RpcError:
                continue
        return answers
