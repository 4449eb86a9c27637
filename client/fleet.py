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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
import xxhash
from grpc_health.v1 import health_pb2, health_pb2_grpc
from vitcache.v1 import vitcache_pb2 as pb

from .client import EncodedImage, ImageFailed, ImageLike, VitCacheClient, _as_input, _failed_with
from .connect import ConnectOptions

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


class FleetClient:
    """Blocking client of several replicas sharing one L2 (the same API as :class:`VitCacheClient`'s ``encode``).

    Invariants:
    - An image is sent to the first replica of its rendezvous order that is usable and has
      not failed it in this request; replicas are tried at most once per image.
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
        orders = [rendezvous_order(digest, self.targets) for digest, _ in inputs]
        tried: list[set[int]] = [set() for _ in inputs]
        results: list[EncodedImage | None] = [None] * len(inputs)
        pending = list(range(len(inputs)))
        for _ in range(len(self._replicas)):  # every round takes one replica off each pending image
            groups: dict[int, list[int]] = {}
            for i in pending:
                replica = self._route(orders[i], tried[i])
                if replica is None:
                    results[i] = self._unavailable(i, inputs[i][0])
                else:
                    groups.setdefault(replica, []).append(i)
            jobs = {r: [inputs[i] for i in idx] for r, idx in groups.items()}
            if len(jobs) == 1:  # one replica: no thread hop
                answers = {r: self._send(r, job, timeout) for r, job in jobs.items()}
            else:
                calls = {r: self._pool.submit(self._send, r, job, timeout) for r, job in jobs.items()}
                answers = {r: call.result() for r, call in calls.items()}
            pending = []
            for r, answered in answers.items():
                if answered is None:
                    self._replicas[r].mark_down()
                    for i in groups[r]:
                        tried[i].add(r)
                    pending.extend(groups[r])
                    continue
                unavailable = False
                for i, result in zip(groups[r], answered, strict=True):
                    if _failed_with(result, grpc.StatusCode.UNAVAILABLE):  # e.g. its encoder process died
                        unavailable = True
                        tried[i].add(r)
                        pending.append(i)
                    else:
                        results[i] = _reindexed(result, i)
                if unavailable:
                    self._replicas[r].mark_down()
            if not pending:
                break
        for i in pending:
            results[i] = self._unavailable(i, inputs[i][0])
        return results  # type: ignore[return-value]

    def _send(
        self, replica: int, inputs: list[tuple[bytes, pb.Image]], timeout: float | None
    ) -> list[EncodedImage] | None:
        """The replica's answers; None if it is unavailable (other errors propagate)."""
        try:
            return self._replicas[replica].client._exchange(inputs, timeout)
        except grpc.RpcError as exc:
            if exc.code() not in _REPLICA_FAILED:  # type: ignore[attr-defined]
                raise
            return None

    def _unavailable(self, index: int, digest: bytes) -> EncodedImage:
        failed = ImageFailed(index, grpc.StatusCode.UNAVAILABLE, "every replica failed this image")
        return EncodedImage(index, digest, [], (), "", failed)

    def stats(self, timeout: float | None = None) -> dict[str, pb.Stats]:
        """Each replica's counters, by target (replicas that do not answer are left out)."""
        answers = {}
        for replica in self._replicas:
            try:
                answers[replica.target] = replica.client.stats(timeout=timeout)
            except grpc.RpcError:
                continue
        return answers
