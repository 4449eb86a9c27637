"""The VitCache servicer: protobuf in, :class:`EmbeddingEngine` calls, protobuf out."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from vitcache.server.security import Access, AccessDenied
from vitcache.server.status import status_code, wire_code
from vitcache.server.wire import (
    LENGTH_DELIMITED,
    Field,
    MalformedMessage,
    TooManyFields,
    count_values,
    fields,
    with_tensors,
)
from vitcache.v1 import vitcache_pb2 as pb
from vitcache.v1 import vitcache_pb2_grpc as pb_grpc

from vitcache.cache.entry import CachedEmbedding
from vitcache.errors import ErrorCode, ImageError
from vitcache.inputs import (
    MAX_PUT_TENSORS,
    DigestOnly,
    EncodedFile,
    EncodedVideo,
    ImageInput,
    RawRGB,
    RawVideo,
    Scope,
    VideoSampling,
)
from vitcache.models.served import validate_pixel_batch
from vitcache.outcomes import ImageOutcome
from vitcache.stats import TenantStats
from vitcache.wire.tensor_codec import TensorBytes

if TYPE_CHECKING:
    from vitcache.engine import EmbeddingEngine

T = TypeVar("T")
M = TypeVar("M", bound=Message)
_IMAGES = pb.EncodeRequest.DESCRIPTOR.fields_by_name["images"].number
_PIXELS = pb.EncodeRequest.DESCRIPTOR.fields_by_name["pixels"].number
_GRID = pb.PixelBatch.DESCRIPTOR.fields_by_name["image_grid_thw"].number
_DIGESTS = pb.FetchRequest.DESCRIPTOR.fields_by_name["digests"].number
_KEYS = pb.FetchRequest.DESCRIPTOR.fields_by_name["keys"].number
_ITEMS = pb.PutRequest.DESCRIPTOR.fields_by_name["items"].number
_EMBEDDINGS = pb.PutItem.DESCRIPTOR.fields_by_name["embeddings"].number
_PUT_GRID = pb.PutItem.DESCRIPTOR.fields_by_name["grid_thw"].number
_PIXEL_VALUES = pb.PixelBatch.DESCRIPTOR.fields_by_name["pixel_values"].number
_SHAPE = pb.Tensor.DESCRIPTOR.fields_by_name["shape"].number
_MAX_DIMS = 8  # of a tensor in a request
#: Fields a request may hold besides its images or digests (its pixels, fields of newer clients).
_EXTRA_FIELDS = 16
#: Requests up to this size are read on the event loop; a bigger one in a worker thread, whose per-image
#: steps leave the loop free to answer health checks and other tenants in between. Fields are counted
#: against the image limit before any is parsed, so a small request can hold no more images than a big
#: one; what 1 MiB adds is a copy of its bytes (tens of us), less than the hand-off to a thread costs
#: the loop (a request of a few new images would otherwise pay it for the parse and again for the digests).
_INLINE_REQUEST_BYTES = 1 << 20


def _invalid(message: str) -> ImageError:
    return ImageError(ErrorCode.INVALID_ARGUMENT, message)


def image_input(image: pb.Image) -> ImageInput | ImageError:
    which = image.WhichOneof("source")
    if which == "encoded":
        return EncodedFile(image.encoded)
    if which == "raw":
        return RawRGB(image.raw.rgb, image.raw.height, image.raw.width)
    if which == "digest":
        return DigestOnly(image.digest)
    if which == "video":
        return video_input(image.video)
    return ImageError(ErrorCode.INVALID_ARGUMENT, "image has no source: set encoded, raw, digest or video")


def video_input(video: pb.Video) -> EncodedVideo | RawVideo | ImageError:
    wire = video.sampling
    sampling = VideoSampling(
        *(
            getattr(wire, name) if wire.HasField(name) else None
            for name in ("fps", "num_frames", "min_pixels", "max_pixels")
        )
    )
    which = video.WhichOneof("source")
    if which == "encoded":
        return EncodedVideo(video.encoded, sampling)
    if which == "raw":
        raw = video.raw
        return RawVideo(raw.rgb, raw.frames, raw.height, raw.width, tuple(raw.timestamps), sampling)
    return ImageError(ErrorCode.INVALID_ARGUMENT, "video has no source: set encoded or raw")


def put_entry(item: pb.PutItem) -> CachedEmbedding:
    """A Put item as the entry it stores; the engine checks what it may hold."""
    grid = tuple(item.grid_thw)
    if grid and len(grid) != 3:
        raise ImageError(ErrorCode.INVALID_ARGUMENT, f"grid_thw must be empty or t, h, w; got {list(grid)}")
    tensors = tuple(TensorBytes(t.dtype, tuple(t.shape), t.data) for t in item.embeddings)
    return CachedEmbedding(grid or (0, 0, 0), tensors)  # type: ignore[arg-type]


def _parsed_image_input(data: memoryview) -> ImageInput | ImageError:
    try:
        return image_input(pb.Image.FromString(data))
    except DecodeError as exc:
        return _invalid(f"malformed Image: {exc}")


def _tensor_dims(payload: memoryview, max_dims: int) -> int:
    """How many ``shape`` values the serialized Tensor ``payload`` holds (some number over ``max_dims`` past it)."""
    try:
        return count_values(fields([payload], max_dims + _EXTRA_FIELDS), _SHAPE, max_dims)
    except TooManyFields:
        return max_dims + 1


def _put_item(payload: memoryview) -> tuple[str, CachedEmbedding | ImageError]:
    """A serialized PutItem's key and entry, parsed only once its counts are within bounds."""
    try:
        found = fields([payload], MAX_PUT_TENSORS + 3 + _EXTRA_FIELDS)  # tensors, grid values, key, newer fields
        if count_values(found, _PUT_GRID, 3) > 3:
            raise _invalid("grid_thw must be empty or t, h, w")
        if any(number == _EMBEDDINGS and _tensor_dims(tensor, _MAX_DIMS) > _MAX_DIMS for number, _, tensor in found):
            raise _invalid(f"a Put tensor has at most {_MAX_DIMS} dimensions")
        item = pb.PutItem.FromString(payload)
        return item.key, put_entry(item)
    except TooManyFields:
        return "", _invalid(f"a Put entry holds 1 to {MAX_PUT_TENSORS} tensors and one grid_thw")
    except (MalformedMessage, DecodeError) as exc:
        return "", _invalid(f"malformed Put item: {exc}")
    except ImageError as exc:
        return "", exc


def _result_header(outcome: ImageOutcome) -> pb.ImageResult:
    """The outcome's ImageResult without its tensors."""
    result = pb.ImageResult(index=outcome.index, digest=outcome.digest, key=outcome.key)
    if outcome.error is not None:
        result.error_code = wire_code(outcome.error.code)
        result.error_message = outcome.error.message
        return result
    assert outcome.entry is not None and outcome.source is not None
    result.source = int(outcome.source)
    result.grid_thw.extend(outcome.entry.grid_thw)
    if (video := outcome.entry.video) is not None:
        result.video.CopyFrom(pb.VideoTiming(**video.to_json()))
        result.not_cached = not outcome.cached
    return result


def image_result(outcome: ImageOutcome) -> pb.ImageResult:
    result = _result_header(outcome)
    for out in outcome.entry.outputs if outcome.error is None and outcome.entry is not None else ():
        result.embeddings.add(dtype=out.dtype, shape=out.shape, data=bytes(out.data))
    return result


def image_result_bytes(outcome: ImageOutcome, metadata_only: bool = False) -> bytes:
    """``image_result(outcome)`` serialized, each tensor copied once on its way out (see ``wire``).

    ``metadata_only`` leaves the tensors out: an existence check needs source and grid alone.
    """
    header = _result_header(outcome)
    if outcome.error is not None or outcome.entry is None:
        return header.SerializeToString()
    return with_tensors(header, () if metadata_only else outcome.entry.outputs)


class VitCacheServicer(pb_grpc.VitCacheServicer):
    def __init__(self, engine: EmbeddingEngine, max_images_per_request: int, access: Access | None = None) -> None:
        self.engine = engine
        self.max_images_per_request = max_images_per_request
        self.access = access or Access.open()

    async def _caller(self, context: grpc.aio.ServicerContext) -> tuple[str, bool]:
        """``Access.caller`` of the call's metadata; a refused caller ends the call."""
        try:
            return self.access.caller(context.invocation_metadata())
        except AccessDenied as denied:  # the interceptor refuses these first; kept for direct use
            await context.abort(status_code(denied.code), denied.message)
            raise  # abort raises; this tells type checkers so

    async def _scope(self, context: grpc.aio.ServicerContext) -> Scope:
        """The caller's tenant and the call's deadline (the client's gRPC deadline, if it set one)."""
        tenant, _ = await self._caller(context)
        remaining = context.time_remaining()
        return Scope(tenant, None if remaining is None else time.monotonic() + remaining)

    async def Encode(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """``request`` is an EncodeRequest's bytes (``wire.add_servicer`` registers it so)."""
        inputs = await self._read(self._encode_inputs, request, context)
        async for outcome in self.engine.encode(inputs, await self._scope(context)):
            yield image_result_bytes(outcome)

    async def Fetch(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """``request`` is a FetchRequest's bytes (``wire.add_servicer`` registers it so)."""
        fetch = await self._read(self._fetch_request, request, context)
        scope = await self._scope(context)
        if fetch.digests:
            async for outcome in self.engine.fetch(list(fetch.digests), scope):
                yield image_result_bytes(outcome, fetch.metadata_only)
        if fetch.keys:  # skipped when empty: an async generator and a queue cost 30 us of a 2 ms hit
            async for outcome in self.engine.fetch_keys(list(fetch.keys), scope, first_index=len(fetch.digests)):
                yield image_result_bytes(outcome, fetch.metadata_only)

    async def Put(self, request: bytes, context: grpc.aio.ServicerContext) -> pb.PutResponse:
        """``request`` is a PutRequest's bytes (``wire.add_servicer`` registers it so)."""
        items = await self._read(self._put_items, request, context)
        scope = await self._scope(context)

        async def store(index: int, key: str, entry: CachedEmbedding | ImageError) -> pb.PutResult:
            try:
                if isinstance(entry, ImageError):
                    raise entry
                await self.engine.put(key, entry, scope)
            except ImageError as exc:
                return pb.PutResult(index=index, error_code=wire_code(exc.code), error_message=exc.message)
            return pb.PutResult(index=index)

        results = await asyncio.gather(*(store(index, *item) for index, item in enumerate(items)))
        return pb.PutResponse(results=results)

    async def _read(self, parse: Callable[[bytes], T], request: bytes, context: grpc.aio.ServicerContext) -> T:
        """``parse(request)``, off the event loop unless the request is small; its ImageError aborts the call."""
        try:
            if len(request) <= _INLINE_REQUEST_BYTES:
                return parse(request)
            return await asyncio.to_thread(parse, request)
        except ImageError as exc:
            await context.abort(status_code(exc.code), exc.message)
            raise  # abort raises; this tells type checkers so

    def _fields(self, chunks: Sequence[bytes | memoryview], per_image: int, what: str) -> list[Field]:
        """``wire.fields`` of a message that holds ``per_image`` of ``what`` per image, bounded by the limit."""
        limit = self.max_images_per_request
        try:
            return fields(chunks, per_image * limit + _EXTRA_FIELDS)
        except TooManyFields:
            raise _invalid(f"more than {per_image * limit} {what} is over --max-images-per-request={limit}") from None
        except MalformedMessage as exc:
            raise _invalid(f"malformed request: {exc}") from None

    def _encode_inputs(self, request: bytes) -> list[ImageInput | ImageError]:
        """The request's images or pixel batch as engine inputs; every count is checked from the wire first."""
        limit = self.max_images_per_request
        found = self._fields([request], 1, "images")
        images = [payload for number, kind, payload in found if number == _IMAGES and kind == LENGTH_DELIMITED]
        pixels = [payload for number, kind, payload in found if number == _PIXELS and kind == LENGTH_DELIMITED]
        if bool(images) == bool(pixels):
            raise _invalid("set exactly one of images or pixels")
        if len(images) > limit:
            raise _invalid(f"{len(images)} images is over --max-images-per-request={limit}")
        if images:
            return [_parsed_image_input(image) for image in images]
        batch_fields = self._fields(pixels, 3, "image_grid_thw values")
        if count_values(batch_fields, _GRID, 3 * limit) > 3 * limit:
            raise _invalid(f"more than {limit} images in image_grid_thw is over --max-images-per-request={limit}")
        if any(n == _PIXEL_VALUES and _tensor_dims(t, _MAX_DIMS) > _MAX_DIMS for n, _, t in batch_fields):
            raise _invalid(f"pixel_values has more than {_MAX_DIMS} dimensions")
        try:
            batch = pb.PixelBatch.FromString(pixels[0] if len(pixels) == 1 else b"".join(pixels))
        except DecodeError as exc:
            raise _invalid(f"malformed pixels: {exc}") from None
        tensor = batch.pixel_values
        return validate_pixel_batch(
            self.engine.served_model, tensor.data, tensor.dtype, tensor.shape, batch.image_grid_thw
        )

    def _counted(self, message: type[M], request: bytes, repeated: tuple[int, ...], what: str) -> M:
        """``request`` parsed as ``message``, once its ``repeated`` fields together hold at most the limit."""
        limit = self.max_images_per_request
        found = self._fields([request], 1, what)
        count = sum(1 for number, kind, _ in found if number in repeated and kind == LENGTH_DELIMITED)
        if count > limit:
            raise _invalid(f"{count} {what} is over --max-images-per-request={limit}")
        try:
            return message.FromString(request)
        except DecodeError as exc:
            raise _invalid(f"malformed request: {exc}") from None

    def _fetch_request(self, request: bytes) -> pb.FetchRequest:
        return self._counted(pb.FetchRequest, request, (_DIGESTS, _KEYS), "digests and keys")

    def _put_items(self, request: bytes) -> list[tuple[str, CachedEmbedding | ImageError]]:
        """Each item's key and entry (or why it has none). Items are parsed one by one, each once its
        tensors and their dimensions are counted from the wire: a small message of many empty tensors
        would otherwise cost gigabytes to parse."""
        limit = self.max_images_per_request
        found = self._fields([request], 1, "items")
        items = [payload for number, kind, payload in found if number == _ITEMS and kind == LENGTH_DELIMITED]
        if len(items) > limit:
            raise _invalid(f"{len(items)} items is over --max-images-per-request={limit}")
        return [_put_item(payload) for payload in items]

    async def GetStats(self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext) -> pb.Stats:
        """Server-wide for a caller that may act as any tenant (no auth, or an unbound token naming no
        tenant), as the metrics port is; otherwise the caller's tenant's own numbers alone."""
        if self.access.requires_token:
            tenant, unbound = await self._caller(context)
            if tenant or not unbound:
                return await self._tenant_stats(tenant)
        snapshot = await self.engine.snapshot_async()
        images, videos, batcher, l1, l2 = snapshot.images, snapshot.videos, snapshot.batcher, snapshot.l1, snapshot.l2
        return pb.Stats(
            l1_hits=images.l1_hits,
            l2_hits=images.l2_hits,
            misses=images.misses,
            images_computed=batcher.images,
            l1_entries=l1.entries,
            l1_bytes=l1.bytes_used,
            redis_connected=l2.connected,
            l1_capacity_bytes=l1.capacity_bytes,
            l1_evictions=l1.evictions,
            errors=images.errors,
            batches=batcher.batches,
            single_flight_joins=images.single_flight_joins,
            l2_errors=l2.errors,
            l2_corrupt=l2.corrupt,
            uptime_seconds=snapshot.uptime_s,
            oom_splits=batcher.oom_splits,
            not_found=images.not_found,
            overloaded=images.overloaded,
            deadline_expired=images.deadline_expired,
            fleet_lock_waits=l2.fleet_lock_waits,
            puts=images.puts,
            videos=pb.VideoStats(
                l1_hits=videos.l1_hits,
                l2_hits=videos.l2_hits,
                misses=videos.misses,
                errors=videos.errors,
                not_found=videos.not_found,
                tokens=videos.tokens,
            ),
            encoders=[
                pb.EncoderStats(
                    device=e.device,
                    alive=e.alive,
                    in_flight=e.in_flight,
                    restarts=e.restarts,
                    batches=e.stats.batches,
                    images=e.stats.images,
                    patches=e.stats.patches,
                    device_seconds=e.stats.device_seconds,
                    memory_allocated=e.memory.get("allocated", 0),
                    memory_reserved=e.memory.get("reserved", 0),
                )
                for e in snapshot.encoders
            ],
        )

    async def _tenant_stats(self, tenant: str) -> pb.Stats:
        """One tenant's counts; the server-wide ones (L1 fill, batches, Redis errors...) stay 0."""
        snapshot = await self.engine.snapshot_async()
        return pb.Stats(
            **asdict(snapshot.tenants.get(tenant, TenantStats())),
            uptime_seconds=snapshot.uptime_s,
            redis_connected=snapshot.l2.connected,
            tenant_only=True,
            tenant=tenant,
        )

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        model = self.engine.served_model
        return pb.ModelInfo(
            family=model.family,
            model=model.model_name,
            dtype=model.dtype,
            outputs=[
                pb.OutputSpec(name=name, hidden_size=size)
                for name, size in zip(model.output_names, model.output_hidden_sizes, strict=True)
            ],
            namespace=model.namespace,
            patch_size=model.patch_size,
            temporal_patch_size=model.temporal_patch_size,
            merge_size=model.merge_size,
            patch_dim=model.patch_dim,
            device=model.device,
            preprocess_config_json=model.preprocess_config_json,
        )
