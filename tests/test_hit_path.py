"""The gRPC hit path's own encoding and decoding, checked against protobuf's, and served end to end."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest
import torch
from google.protobuf.message import DecodeError
from vitcache.client import VitCacheClient
from vitcache.client.wire import decode_result
from vitcache.server.service import image_result, image_result_bytes
from vitcache.v1 import vitcache_pb2 as pb

from vitcache.cache.entry import CachedEmbedding
from vitcache.config import VitcacheConfig
from vitcache.errors import ErrorCode, ImageError
from vitcache.outcomes import ImageOutcome, Source

from .conftest import jpeg_bytes, png_bytes


def outcomes() -> list[ImageOutcome]:
    generator = torch.Generator().manual_seed(0)
    merged = torch.randn(64, 3584, generator=generator).to(torch.bfloat16)  # past one-byte varint lengths
    deepstack = [torch.randn(64, 32, generator=generator) for _ in range(2)]
    return [
        ImageOutcome(0, b"\x01" * 16, CachedEmbedding.from_tensors((1, 16, 16), [merged]), Source.L1),
        ImageOutcome(300, b"\x02" * 16, CachedEmbedding.from_tensors((2, 4, 8), [merged, *deepstack]), Source.L2),
        ImageOutcome(7, b"\x03" * 16, CachedEmbedding.from_tensors((1, 2, 2), [torch.empty(0, 8)]), Source.COMPUTED),
        ImageOutcome(3, b"", error=ImageError(ErrorCode.INVALID_ARGUMENT, "not an image")),
    ]


@pytest.mark.parametrize("outcome", outcomes(), ids=["one-output", "deepstack", "empty-tensor", "error"])
def test_hit_path_bytes_parse_as_the_message_protobuf_builds(outcome: ImageOutcome) -> None:
    assert pb.ImageResult.FromString(image_result_bytes(outcome)) == image_result(outcome)


@pytest.mark.parametrize("outcome", outcomes(), ids=["one-output", "deepstack", "empty-tensor", "error"])
def test_client_reads_tensors_as_views_of_the_received_bytes(outcome: ImageOutcome) -> None:
    message = image_result(outcome)
    # protobuf's canonical field order, unlike the server's (tensors last): order must not matter.
    for data in (message.SerializeToString(), image_result_bytes(outcome)):
        received = decode_result(data)
        assert (received.index, received.digest, received.source) == (message.index, message.digest, message.source)
        assert list(received.grid_thw) == list(message.grid_thw)
        assert (received.error_code, received.error_message) == (message.error_code, message.error_message)
        assert len(received.embeddings) == len(message.embeddings)
        for got, want in zip(received.embeddings, message.embeddings, strict=True):
            assert (got.dtype, list(got.shape), bytes(got.data)) == (want.dtype, list(want.shape), want.data)
            assert isinstance(got.data, memoryview) and got.data.obj is data  # a view, not a copy


def test_client_decoder_rejects_truncated_messages() -> None:
    data = image_result_bytes(outcomes()[1])
    for cut in (1, len(data) // 2, len(data) - 1):
        with pytest.raises(DecodeError):
            decode_result(data[:cut])


def test_grpc_hits_serve_the_cached_bytes_through_both_codecs(start_server_thread, encoder) -> None:  # type: ignore[no-untyped-def]
    server = start_server_thread(VitcacheConfig.of(), encoder)
    images = [png_bytes(64, 48, 11), png_bytes(48, 64, 12)]
    with VitCacheClient(server.target) as client:
        computed = [r.raise_for_error() for r in client.encode(images)]
        fetched = client.fetch([r.digest for r in computed] + [b"\x00" * 16])
    for got, want in zip(fetched, computed, strict=False):
        assert got.raise_for_error().source == "L1"
        assert got.grid_thw == want.grid_thw
        cached = server.engine.l1.get(want.digest)
        assert got.embeddings[0].numpy().tobytes() == bytes(cached.outputs[0].data)
    assert fetched[2].error is not None and fetched[2].error.code.name == "NOT_FOUND"


class _CountingExecutor(ThreadPoolExecutor):
    """The server loop's default executor (``asyncio.to_thread``'s), counting the work handed to it."""

    def __init__(self) -> None:
        super().__init__(max_workers=2)
        self.submitted = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


def test_a_request_of_a_few_images_is_parsed_and_hashed_on_the_loop(start_server_thread, encoder) -> None:  # type: ignore[no-untyped-def]
    """A hand-off to a worker thread costs the serving process more CPU than parsing and hashing a few
    images; only a big request is worth it (its steps would hold the loop)."""
    server = start_server_thread(VitcacheConfig.of(), encoder)
    small = [jpeg_bytes(448, 448, seed) for seed in (1, 2)]  # tens of KB each
    big = [png_bytes(640, 640, 3)]  # noise: over 1 MiB
    assert sum(map(len, small)) < 256 << 10 and len(big[0]) > 1 << 20
    with VitCacheClient(server.target) as client:
        assert all(r.ok for r in client.encode(small + big, hash_first=False))
        executor = _CountingExecutor()

        async def use_counting_executor() -> None:
            asyncio.get_running_loop().set_default_executor(executor)

        server.call(use_counting_executor())
        assert [r.source for r in client.encode(small, hash_first=False)] == ["L1", "L1"]
        assert executor.submitted == 0
        assert [r.source for r in client.encode(big, hash_first=False)] == ["L1"]
        assert executor.submitted == 2  # the parse, then the digest
