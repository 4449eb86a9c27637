"""The VitCache servicer: protobuf in, :class:`EmbeddingEngine` calls, protobuf out."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc
from vitcache.server.security import Access, AccessDenied
from vitcache.server.status import status_code, wire_code
from vitcache.server.wire import with_tensors
from vitcache.v1 import vitcache_pb2 as pb
from vitcache.v1 import vitcache_pb2_grpc as pb_grpc

from vitcache.engine import DigestOnly, EmbeddingEngine, EncodedFile, ImageInput, ImageOutcome, RawRGB, Scope
from vitcache.entry import CachedEmbedding
from vitcache.errors import ErrorCode, ImageError
from vitcache.tensor_codec import TensorBytes, dtype_name


def image_input(image: pb.Image) -> ImageInput | ImageError:
    which = image.WhichOneof("source")
    if which == "encoded":
        return EncodedFile(image.encoded)
    if which == "raw":
        return RawRGB(image.raw.rgb, image.raw.height, image.raw.width)
    if which == "digest":
        return DigestOnly(image.digest)
    return ImageError(ErrorCode.INVALID_ARGUMENT, "image has no source: set encoded, raw or digest")


def put_entry(item: pb.PutItem) -> CachedEmbedding:
    """A Put item as the entry it stores; the engine checks what it may hold."""
    grid = tuple(item.grid_thw)
    if grid and len(grid) != 3:
        raise ImageError(ErrorCode.INVALID_ARGUMENT, f"grid_thw must be empty or t, h, w; got {list(grid)}")
    tensors = tuple(TensorBytes(t.dtype, tuple(t.shape), t.data) for t in item.embeddings)
    return CachedEmbedding(grid or (0, 0, 0), tensors)  # type: ignore[arg-type]


def image_result(outcome: ImageOutcome) -> pb.ImageResult:
    result = pb.ImageResult(index=outcome.index, digest=outcome.digest, key=outcome.key)
    if outcome.error is not None:
        result.error_code = wire_code(outcome.error.code)
        result.error_message = outcome.error.message
        return result
    assert outcome.entry is not None and outcome.source is not None
    result.source = int(outcome.source)
    result.grid_thw.extend(outcome.entry.grid_thw)
    for out in outcome.entry.outputs:
        result.embeddings.add(dtype=out.dtype, shape=out.shape, data=bytes(out.data))
    return result


def image_result_bytes(outcome: ImageOutcome, metadata_only: bool = False) -> bytes:
    """``image_result(outcome)`` serialized, each tensor copied once on its way out (see ``wire``).

    ``metadata_only`` leaves the tensors out: an existence check needs source and grid alone.
    """
    if outcome.entry is None:
        return image_result(outcome).SerializeToString()
    bare = replace(outcome, entry=replace(outcome.entry, outputs=()))
    return with_tensors(image_result(bare), () if metadata_only else outcome.entry.outputs)


class VitCacheServicer(pb_grpc.VitCacheServicer):
    def __init__(self, engine: EmbeddingEngine, max_images_per_request: int, access: Access | None = None) -> None:
        self.engine = engine
        self.max_images_per_request = max_images_per_request
        self.access = access or Access.open()

    async def _scope(self, context: grpc.aio.ServicerContext) -> Scope:
        """The caller's tenant and the call's deadline (the client's gRPC deadline, if it set one)."""
        try:
            tenant = self.access.tenant(context.invocation_metadata())
        except AccessDenied as denied:  # the interceptor refuses these first; kept for direct use
            await context.abort(status_code(denied.code), denied.message)
        remaining = context.time_remaining()
        return Scope(tenant, None if remaining is None else time.monotonic() + remaining)

    async def Encode(self, request: pb.EncodeRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        has_pixels = request.HasField("pixels")
        if bool(request.images) == has_pixels:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "set exactly one of images or pixels")
        inputs: list[ImageInput | ImageError]
        if has_pixels:
            tensor = request.pixels.pixel_values
            try:
                inputs = list(
                    self.engine.validate_pixel_batch(
                        tensor.data, tensor.dtype, tensor.shape, request.pixels.image_grid_thw
                    )
                )
            except ImageError as exc:
                await context.abort(status_code(exc.code), exc.message)
        else:
            inputs = [image_input(image) for image in request.images]
        if len(inputs) > self.max_images_per_request:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(inputs)} images is over --max-images-per-request={self.max_images_per_request}",
            )
        async for outcome in self.engine.encode(inputs, await self._scope(context)):
            yield image_result_bytes(outcome)

    async def Fetch(self, request: pb.FetchRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        count = len(request.digests) + len(request.keys)
        if count > self.max_images_per_request:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{count} digests and keys is over --max-images-per-request={self.max_images_per_request}",
            )
        scope = await self._scope(context)
        async for outcome in self.engine.fetch(list(request.digests), scope):
            yield image_result_bytes(outcome, request.metadata_only)
        async for outcome in self.engine.fetch_keys(list(request.keys), scope, first_index=len(request.digests)):
            yield image_result_bytes(outcome, request.metadata_only)

    async def Put(self, request: pb.PutRequest, context: grpc.aio.ServicerContext) -> pb.PutResponse:
        if len(request.items) > self.max_images_per_request:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(request.items)} items is over --max-images-per-request={self.max_images_per_request}",
            )
        scope = await self._scope(context)

        async def store(index: int, item: pb.PutItem) -> pb.PutResult:
            try:
                await self.engine.put(item.key, put_entry(item), scope)
            except ImageError as exc:
                return pb.PutResult(index=index, error_code=wire_code(exc.code), error_message=exc.message)
            return pb.PutResult(index=index)

        results = await asyncio.gather(*(store(index, item) for index, item in enumerate(request.items)))
        return pb.PutResponse(results=results)

    async def GetStats(self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext) -> pb.Stats:
        engine = self.engine
        stats, batcher = engine.stats, engine.pipeline.stats
        l2 = engine.l2
        return pb.Stats(
            l1_hits=stats.l1_hits,
            l2_hits=stats.l2_hits,
            misses=stats.misses,
            images_computed=batcher.images,
            l1_entries=len(engine.l1),
            l1_bytes=engine.l1.bytes_used,
            redis_connected=l2 is not None and l2.connected,
            l1_capacity_bytes=engine.l1.capacity_bytes,
            l1_evictions=engine.l1.evictions,
            errors=stats.errors,
            batches=batcher.batches,
            single_flight_joins=stats.single_flight_joins,
            l2_errors=l2.stats.errors if l2 else 0,
            l2_corrupt=l2.stats.corrupt if l2 else 0,
            uptime_seconds=engine.uptime_s,
            oom_splits=batcher.oom_splits,
            not_found=stats.not_found,
            overloaded=stats.overloaded,
            deadline_expired=stats.deadline_expired,
            fleet_lock_waits=engine.fleet_lock.waits if engine.fleet_lock else 0,
            puts=stats.puts,
        )

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        encoder = self.engine.spec
        config = encoder.preprocess_config
        return pb.ModelInfo(
            family=encoder.family,
            model=encoder.model_name,
            dtype=dtype_name(encoder.dtype),
            outputs=[
                pb.OutputSpec(name=name, hidden_size=size)
                for name, size in zip(encoder.output_names, encoder.output_hidden_sizes, strict=True)
            ],
            namespace=encoder.namespace,
            patch_size=config.patch_size,
            temporal_patch_size=config.temporal_patch_size,
            merge_size=encoder.merge_size,
            patch_dim=config.patch_dim,
            device=encoder.device,
            preprocess_config_json=config.to_json(),
        )
