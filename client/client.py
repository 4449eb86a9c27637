"""Sync and asyncio clients of the vitcache.v1 API.

Both speak the hash-first protocol: digests go first, bytes only for the images the server
does not hold. Embeddings come back as CPU tensors viewing the received bytes; nothing here
touches CUDA, so tensor-parallel workers can use it without opening a device context.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import numpy as np
import torch
from vitcache.v1 import vitcache_pb2 as pb

from vitcache.digest import digest_file, digest_pixels, digest_rgb, digest_video_file, digest_video_frames
from vitcache.inputs import VideoSampling
from vitcache.wire.tensor_codec import TensorBytes, dtype_name
from vitcache.wire.timing import VideoTiming

from .connect import ConnectOptions, open_async_channel, open_channel
from .shm import ShmChannel, ShmResult
from .wire import result_stub


@dataclass(frozen=True)
class Video:
    """A video to encode (Qwen families): a file's bytes or path (MP4, WebM, MKV, ...), or uint8
    (T, H, W, 3) RGB frames with the second each is shown at. The sampling settings are part of its
    digest; unset ones take the model's video processor's values (fps and num_frames: files only)."""

    source: bytes | memoryview | str | os.PathLike | np.ndarray
    timestamps: Sequence[float] | None = None  # frames only: one per frame, ascending
    fps: float | None = None
    num_frames: int | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None

    def as_input(self, key: bytes | None) -> tuple[bytes, pb.Image]:
        """(digest, the message that carries the video's bytes)."""
        sampling = VideoSampling(self.fps, self.num_frames, self.min_pixels, self.max_pixels)
        wire = pb.VideoSampling(**{k: v for k, v in vars(sampling).items() if v is not None})
        header = sampling.header()
        if isinstance(self.source, np.ndarray):
            frames = self.source
            if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
                raise ValueError(f"video frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
            if self.timestamps is None or len(self.timestamps) != len(frames):
                raise ValueError("video frames need timestamps, one per frame")
            rgb, (count, height, width) = np.ascontiguousarray(frames).tobytes(), frames.shape[:3]
            seconds = [float(s) for s in self.timestamps]
            raw = pb.RawVideo(rgb=rgb, frames=count, height=height, width=width, timestamps=seconds)
            digest = digest_video_frames(rgb, count, height, width, seconds, header, key)
            return digest, pb.Image(video=pb.Video(raw=raw, sampling=wire))
        source = self.source
        data = Path(source).read_bytes() if isinstance(source, (str, os.PathLike)) else bytes(source)
        return digest_video_file(data, header, key), pb.Image(video=pb.Video(encoded=data, sampling=wire))


#: An encoded file's bytes, a path to one, uint8 HWC RGB pixels, or a :class:`Video`.
ImageLike = bytes | memoryview | str | os.PathLike | np.ndarray | Video
#: Items one Fetch or Put carries at most (the server's default --max-images-per-request); more go in several.
MAX_ITEMS_PER_REQUEST = 256
#: What ``put`` stores: key -> tensors, as a mapping or as (key, tensors) pairs.
PutItems = Mapping[str, Sequence[torch.Tensor]] | Sequence[tuple[str, Sequence[torch.Tensor]]]

_SOURCES = {pb.L1: "L1", pb.L2: "L2", pb.COMPUTED: "COMPUTED"}
_CODES = {code.value[0]: code for code in grpc.StatusCode}


class ImageFailed(RuntimeError):
    def __init__(self, index: int, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"image {index}: {code.name}: {message}")
        self.index = index
        self.code = code
        self.message = message


@dataclass(frozen=True)
class EncodedImage:
    """One image's result. ``embeddings`` are CPU tensors viewing the received bytes."""

    index: int
    digest: bytes
    embeddings: list[torch.Tensor]
    grid_thw: tuple[int, ...]
    source: str  # "L1", "L2", "COMPUTED"; "" on error
    error: ImageFailed | None = None
    key: str = ""  # the Put key, for results of ``fetch(keys=...)``
    video: VideoTiming | None = None  # a video's timing (second_per_grid_ts, per-group timestamps)
    cached: bool = True  # False: a video over the server's --max-cached-video-bytes, computed but not stored

    @property
    def ok(self) -> bool:
        return self.error is None

    def raise_for_error(self) -> EncodedImage:
        if self.error is not None:
            raise self.error
        return self

    def temporal_groups(self) -> list[torch.Tensor]:
        """Each output as (grid_thw[0], tokens per group, hidden): a video's tokens per temporal group (what
        Qwen3-VL places after each group's timestamp), a view, no copy. An image has one group."""
        groups = self.grid_thw[0]
        return [out.view(groups, out.shape[0] // groups, out.shape[1]) for out in self.embeddings]


def _as_input(image: ImageLike, key: bytes | None = None) -> tuple[bytes, pb.Image]:
    """(digest, the message that carries the image's bytes); ``key`` for keyed digests."""
    if isinstance(image, Video):
        return image.as_input(key)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"pixel arrays must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
        rgb = np.ascontiguousarray(image).tobytes()
        height, width = image.shape[:2]
        return digest_rgb(rgb, height, width, key), pb.Image(raw=pb.RawImage(rgb=rgb, height=height, width=width))
    if isinstance(image, (str, os.PathLike)):
        image = Path(image).read_bytes()
    data = bytes(image)
    return digest_file(data, key), pb.Image(encoded=data)


def _decode(result: pb.ImageResult, index: int) -> EncodedImage:
    if result.error_code:
        code = _CODES.get(result.error_code, grpc.StatusCode.UNKNOWN)
        failed = ImageFailed(index, code, result.error_message)
        return EncodedImage(index, result.digest, [], tuple(result.grid_thw), "", failed, result.key)
    embeddings = [TensorBytes(t.dtype, tuple(t.shape), t.data).to_tensor() for t in result.embeddings]
    video = None
    if result.HasField("video"):
        wire = result.video
        video = VideoTiming(wire.frames, wire.sampled_fps, wire.second_per_grid_ts, tuple(wire.timestamps))
    source = _SOURCES[result.source]
    return EncodedImage(
        index, result.digest, embeddings, tuple(result.grid_thw), source, None, result.key, video, not result.not_cached
    )


def put_pairs(items: PutItems) -> list[tuple[str, Sequence[torch.Tensor]]]:
    """``put``'s items as (key, tensors) pairs, in order."""
    return list(items.items()) if isinstance(items, Mapping) else list(items)


def _put_requests(items: PutItems, grid_thws: Sequence[Sequence[int]] | None) -> list[tuple[int, pb.PutRequest]]:
    """(index of its first item, request) per :data:`MAX_ITEMS_PER_REQUEST` items."""
    pairs = put_pairs(items)
    if grid_thws is not None and len(grid_thws) != len(pairs):
        raise ValueError(f"{len(grid_thws)} grids for {len(pairs)} items")
    requests = []
    for start in range(0, len(pairs), MAX_ITEMS_PER_REQUEST):
        request = pb.PutRequest()
        for i in range(start, min(len(pairs), start + MAX_ITEMS_PER_REQUEST)):
            key, tensors = pairs[i]
            item = request.items.add(key=key, grid_thw=[int(v) for v in grid_thws[i]] if grid_thws is not None else [])
            for tensor in tensors:
                data = TensorBytes.from_tensor(tensor)
                item.embeddings.add(dtype=data.dtype, shape=data.shape, data=data.data)
        requests.append((start, request))
    return requests


def _put_errors(response: pb.PutResponse, start: int) -> list[ImageFailed | None]:
    """One entry per item of a request whose first item is ``start``: None where it was stored."""
    errors: list[ImageFailed | None] = [None] * len(response.results)
    for r in response.results:
        if r.error_code:
            code = _CODES.get(r.error_code, grpc.StatusCode.UNKNOWN)
            errors[r.index] = ImageFailed(start + r.index, code, r.error_message)
    return errors


def _fetch_requests(
    digests: Sequence[bytes], keys: Sequence[str], metadata_only: bool
) -> list[tuple[int, pb.FetchRequest]]:
    """(index of its first item, request) per :data:`MAX_ITEMS_PER_REQUEST` digests, then keys."""
    count, requests = len(digests) + len(keys), []
    for start in range(0, count, MAX_ITEMS_PER_REQUEST):
        end = min(count, start + MAX_ITEMS_PER_REQUEST)
        chunk_digests = digests[start : min(end, len(digests))]
        chunk_keys = keys[max(0, start - len(digests)) : max(0, end - len(digests))]
        requests.append((start, pb.FetchRequest(digests=chunk_digests, keys=chunk_keys, metadata_only=metadata_only)))
    return requests


def _fetched(start: int, results: Iterable[pb.ImageResult]) -> list[EncodedImage]:
    return sorted((_decode(r, start + r.index) for r in results), key=lambda r: r.index)


def _from_shm(result: ShmResult, digest: bytes, index: int) -> EncodedImage:
    if result.error is not None:
        code, message = result.error
        failed = ImageFailed(index, _CODES.get(code, grpc.StatusCode.UNKNOWN), message)
        return EncodedImage(index, digest, [], (), "", failed)
    return EncodedImage(index, digest, result.embeddings, result.grid_thw, _SOURCES[result.source], video=result.video)


_SHM_RETRIED_OVER_GRPC = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED)


def _failed_with(result: EncodedImage, code: grpc.StatusCode) -> bool:
    return result.error is not None and result.error.code is code


def _pixel_request(
    pixel_values: torch.Tensor, grid_thw: torch.Tensor | Sequence[Sequence[int]], key: bytes | None = None
):
    """(per-image digests, the PixelBatch request); digests follow vitcache.digest."""
    values = pixel_values.detach().to("cpu").contiguous()
    grids = [tuple(int(v) for v in g) for g in (grid_thw.tolist() if torch.is_tensor(grid_thw) else grid_thw)]
    data = TensorBytes.from_tensor(values)
    view, row_bytes, start, digests = memoryview(data.data), values.shape[1] * values.element_size(), 0, []
    for t, h, w in grids:
        end = start + t * h * w * row_bytes
        digests.append(digest_pixels(view[start:end], (t, h, w), dtype_name(values.dtype), values.shape[1], key))
        start = end
    batch = pb.PixelBatch(
        pixel_values=pb.Tensor(dtype=data.dtype, shape=data.shape, data=data.data),
        image_grid_thw=[v for g in grids for v in g],
    )
    return digests, pb.EncodeRequest(pixels=batch)


class _Plan:
    """Bookkeeping of one hash-first exchange: which inputs still need their bytes sent."""

    def __init__(self, count: int) -> None:
        self.results: list[EncodedImage | None] = [None] * count
        self.missing: list[int] = []

    def take_first(self, results: Iterable[pb.ImageResult]) -> None:
        self.take_found(_decode(result, result.index) for result in results)

    def take_found(self, results: Iterable[EncodedImage]) -> None:
        for result in results:
            if _failed_with(result, grpc.StatusCode.NOT_FOUND):
                self.missing.append(result.index)
            else:
                self.results[result.index] = result

    def take_second(self, results: Iterable[pb.ImageResult]) -> None:
        for result in results:
            index = self.missing[result.index]
            self.results[index] = _decode(result, index)

    def done(self) -> list[EncodedImage]:
        assert all(r is not None for r in self.results), "server answered fewer images than sent"
        return self.results  # type: ignore[return-value]


class VitCacheClient:
    """Blocking client. ``target`` is a gRPC target such as ``"localhost:50051"``; ``options``
    carry TLS, token, tenant and digest key (:class:`ConnectOptions`). With ``shm_socket``
    (the server's ``--shm-socket``, same host only) lookups are answered in shared memory
    and only image bytes travel over gRPC; ``shm_shared_l1`` and ``shm_shared_index`` as in :class:`ShmChannel`."""

    def __init__(
        self,
        target: str,
        max_message_bytes: int = 256 << 20,
        options: ConnectOptions | None = None,
        shm_socket: str | os.PathLike | None = None,
        shm_shared_l1: bool = True,
        shm_shared_index: bool = True,
    ) -> None:
        self.options = options or ConnectOptions()
        self._channel = open_channel(target, self.options, max_message_bytes)
        self._stub = result_stub(self._channel)
        self._shm = None
        if shm_socket is not None:
            metadata = self.options.metadata()
            self._shm = ShmChannel(shm_socket, metadata, shared_l1=shm_shared_l1, shared_index=shm_shared_index)

    def close(self) -> None:
        self._channel.close()
        if self._shm is not None:
            self._shm.close()

    def __enter__(self) -> VitCacheClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def encode(
        self, images: Sequence[ImageLike], timeout: float | None = None, hash_first: bool = True
    ) -> list[EncodedImage]:
        """Embeddings of ``images`` in input order; a failed image carries ``error``.

        ``hash_first=False`` sends every image's bytes at once: one round trip instead of
        two when the images are likely new to the server, more upload when they are not.
        """
        return self._exchange([_as_input(image, self.options.digest_key) for image in images], timeout, hash_first)

    def _exchange(
        self, inputs: Sequence[tuple[bytes, pb.Image]], timeout: float | None, hash_first: bool = True
    ) -> list[EncodedImage]:
        """The hash-first exchange (or a single one) for inputs already digested by :func:`_as_input`."""
        plan = _Plan(len(inputs))
        if not hash_first:
            plan.missing = list(range(len(inputs)))
        elif self._shm is not None:
            plan.take_found(self.fetch([digest for digest, _ in inputs], timeout))
        else:
            first = pb.EncodeRequest(images=[pb.Image(digest=digest) for digest, _ in inputs])
            plan.take_first(self._stub.Encode(first, timeout=timeout))
        if plan.missing:
            second = pb.EncodeRequest(images=[inputs[i][1] for i in plan.missing])
            plan.take_second(self._stub.Encode(second, timeout=timeout))
        return plan.done()

    def encode_pixels(
        self,
        pixel_values: torch.Tensor,
        grid_thw: torch.Tensor | Sequence[Sequence[int]],
        timeout: float | None = None,
    ) -> list[EncodedImage]:
        """Like ``encode`` for a batch already preprocessed by the model's HF processor."""
        digests, request = _pixel_request(pixel_values, grid_thw, self.options.digest_key)
        cached = {r.index: r for r in self.fetch(digests, timeout=timeout) if r.ok}
        if len(cached) == len(digests):
            return [cached[i] for i in range(len(digests))]
        computed = {r.index: _decode(r, r.index) for r in self._stub.Encode(request, timeout=timeout)}
        return [cached.get(i) or computed[i] for i in range(len(digests))]

    def fetch(
        self,
        digests: Sequence[bytes] = (),
        timeout: float | None = None,
        *,
        keys: Sequence[str] = (),
        metadata_only: bool = False,
    ) -> list[EncodedImage]:
        """Cached entries by digest, then by Put key (NOT_FOUND errors for misses); never computes.

        ``metadata_only``: results carry source and grid but no embeddings (an existence check).
        With ``shm_socket``, digests' embeddings arrive in shared memory; keys always over gRPC.
        """
        if self._shm is None or metadata_only:
            return self._fetch_grpc(digests, keys, metadata_only, timeout)
        results: list[EncodedImage] = []
        for start in range(0, len(digests), MAX_ITEMS_PER_REQUEST):
            chunk = digests[start : start + MAX_ITEMS_PER_REQUEST]
            results += [_from_shm(r, chunk[r.index], start + r.index) for r in self._shm.fetch(chunk, timeout)]
        # An image the arena had no room for (its earlier tensors still alive), or whose entry kept being
        # replaced while it was read from the shared L1, comes over gRPC.
        full = [r.index for r in results if any(_failed_with(r, code) for code in _SHM_RETRIED_OVER_GRPC)]
        for result in self._fetch_grpc([digests[i] for i in full], (), False, timeout):
            results[full[result.index]] = replace(result, index=full[result.index])
        if keys:
            results += [replace(r, index=r.index + len(digests)) for r in self._fetch_grpc((), keys, False, timeout)]
        return results

    def _fetch_grpc(
        self, digests: Sequence[bytes], keys: Sequence[str], metadata_only: bool, timeout: float | None
    ) -> list[EncodedImage]:
        results: list[EncodedImage] = []
        for start, request in _fetch_requests(digests, keys, metadata_only):
            results += _fetched(start, self._stub.Fetch(request, timeout=timeout))
        return results

    def put(
        self, items: PutItems, grid_thws: Sequence[Sequence[int]] | None = None, timeout: float | None = None
    ) -> list[ImageFailed | None]:
        """Stores caller-computed tensors under caller keys (their own key space; see the README's Put).

        Returns one entry per item: None where it was stored, else why not.
        """
        errors: list[ImageFailed | None] = []
        for start, request in _put_requests(items, grid_thws):
            errors += _put_errors(self._stub.Put(request, timeout=timeout), start)
        return errors

    def stats(self, timeout: float | None = None) -> pb.Stats:
        return self._stub.GetStats(pb.GetStatsRequest(), timeout=timeout)

    def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        return self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout)


class AsyncVitCacheClient:
    """asyncio twin of :class:`VitCacheClient` (grpc.aio)."""

    def __init__(self, target: str, max_message_bytes: int = 256 << 20, options: ConnectOptions | None = None) -> None:
        self.options = options or ConnectOptions()
        self._channel = open_async_channel(target, self.options, max_message_bytes)
        self._stub = result_stub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncVitCacheClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def encode(self, images: Sequence[ImageLike], timeout: float | None = None) -> list[EncodedImage]:
        inputs = [_as_input(image, self.options.digest_key) for image in images]
        plan = _Plan(len(inputs))
        first = pb.EncodeRequest(images=[pb.Image(digest=digest) for digest, _ in inputs])
        plan.take_first([r async for r in self._stub.Encode(first, timeout=timeout)])
        if plan.missing:
            second = pb.EncodeRequest(images=[inputs[i][1] for i in plan.missing])
            plan.take_second([r async for r in self._stub.Encode(second, timeout=timeout)])
        return plan.done()

    async def fetch(
        self,
        digests: Sequence[bytes] = (),
        timeout: float | None = None,
        *,
        keys: Sequence[str] = (),
        metadata_only: bool = False,
    ) -> list[EncodedImage]:
        results: list[EncodedImage] = []
        for start, request in _fetch_requests(digests, keys, metadata_only):
            results += _fetched(start, [r async for r in self._stub.Fetch(request, timeout=timeout)])
        return results

    async def put(
        self, items: PutItems, grid_thws: Sequence[Sequence[int]] | None = None, timeout: float | None = None
    ) -> list[ImageFailed | None]:
        errors: list[ImageFailed | None] = []
        for start, request in _put_requests(items, grid_thws):
            errors += _put_errors(await self._stub.Put(request, timeout=timeout), start)
        return errors

    async def stats(self, timeout: float | None = None) -> pb.Stats:
        return await self._stub.GetStats(pb.GetStatsRequest(), timeout=timeout)

    async def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        return await self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout)
