"""Fuzzing with hypothesis: malformed images and protobuf fields against a real server and Redis,
and damaged Redis values against the L2 tier. Bounded and derandomized, so CI runs the same cases.

The properties: the server always answers (per-image errors, or INVALID_ARGUMENT for a request
that is malformed as a whole), never fails internally, stays healthy, and stores nothing for
bad input: L1 and Redis grow by exactly the images it answered as computed.
"""

from __future__ import annotations

import asyncio
import io
import struct
import zlib

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from vitcache.server.wire import LENGTH_DELIMITED, count_values, fields, varint
from vitcache.v1 import vitcache_pb2 as pb
from vitcache.v1 import vitcache_pb2_grpc as pb_grpc

from vitcache.cache.entry import CachedEmbedding, CorruptEntry
from vitcache.cache.tiers import L2Unavailable, RedisTier
from vitcache.config import VitcacheConfig

from .conftest import png_bytes

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
VALID_PNG = png_bytes(56, 56, 1234)
U32 = st.integers(0, 2**32 - 1)


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG signature and a well-formed IHDR chunk claiming any size, with no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    rgb = np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(buf, format="JPEG")
    return buf.getvalue()


images = st.one_of(
    st.binary(max_size=512).map(lambda b: pb.Image(encoded=b)),
    st.integers(0, len(VALID_PNG) - 1).map(lambda n: pb.Image(encoded=VALID_PNG[:n])),  # truncated
    st.tuples(st.integers(0, 255), st.integers(16, 2000)).map(  # truncated JPEG
        lambda s: pb.Image(encoded=_jpeg(s[0])[: s[1]])
    ),
    st.tuples(st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1)).map(  # huge or zero dimensions
        lambda wh: pb.Image(encoded=_png_claiming(*wh))
    ),
    st.tuples(st.binary(max_size=300), U32, U32).map(  # raw pixels of the wrong length or size
        lambda r: pb.Image(raw=pb.RawImage(rgb=r[0], height=r[1], width=r[2]))
    ),
    st.binary(max_size=40).map(lambda b: pb.Image(digest=b)),
    st.just(pb.Image()),
    st.just(pb.Image(encoded=VALID_PNG)),  # good images mixed in must still succeed
)

DTYPES = st.sampled_from(["float32", "bfloat16", "float16", "float64", "int8", "uint8", "", "float", "\x00"])
PATCH_DIM = 1176  # the tiny Qwen2.5-VL: 3 channels * 2 frames * 14 * 14


@st.composite
def pixel_batches(draw: st.DrawFn) -> pb.EncodeRequest:
    dtype = draw(DTYPES)
    grid = draw(st.lists(st.one_of(st.integers(0, 6), U32), max_size=7))
    if draw(st.booleans()):  # shapes that agree with the data (and maybe the grid)
        rows = draw(st.integers(0, 8))
        shape = [rows, draw(st.sampled_from([PATCH_DIM, PATCH_DIM - 1, 3]))]
        itemsize = 2 if dtype in ("bfloat16", "float16") else 4
        data = bytes(draw(st.integers(0, 255)) for _ in range(1)) * (shape[0] * shape[1] * itemsize)
    else:
        shape = draw(st.lists(st.integers(-(2**40), 2**40), max_size=3))
        data = draw(st.binary(max_size=256))
    tensor = pb.Tensor(dtype=dtype, shape=shape, data=data)
    return pb.EncodeRequest(pixels=pb.PixelBatch(pixel_values=tensor, image_grid_thw=grid))


@pytest.fixture
def fuzz_target(start_server_thread, encoder, redis_server):  # type: ignore[no-untyped-def]
    srv = start_server_thread(VitcacheConfig.of(redis_url=redis_server.url, max_images_per_request=8), encoder)
    channel = grpc.insecure_channel(srv.target)
    yield srv, pb_grpc.VitCacheStub(channel), health_pb2_grpc.HealthStub(channel), redis_server
    channel.close()


def _check_answer(fuzz_target, request: pb.EncodeRequest, count: int | None) -> None:  # type: ignore[no-untyped-def]
    srv, stub, health, redis_server = fuzz_target
    l1_before, keys_before = len(srv.engine.l1), redis_server.client().dbsize()
    try:
        results = list(stub.Encode(request, timeout=60))
    except grpc.RpcError as exc:
        # Only whole-request validation may refuse the call; nothing inside may fail unexpectedly.
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details())
        results = []
    else:
        if count is not None:
            assert sorted(r.index for r in results) == list(range(count))
        for r in results:
            assert (r.error_code != 0) == (not r.embeddings), r
            assert r.error_code in (0, grpc.StatusCode.INVALID_ARGUMENT.value[0], grpc.StatusCode.NOT_FOUND.value[0])
            assert r.error_code == 0 or r.error_message
    srv.call(srv.engine.drain())
    # A COMPUTED image was in neither tier before (an image cached by an earlier example comes back L1).
    computed = {r.digest for r in results if r.error_code == 0 and r.source == pb.COMPUTED}
    assert len(srv.engine.l1) - l1_before == len(computed)
    assert redis_server.client().dbsize() - keys_before == len(computed)
    check = health.Check(health_pb2.HealthCheckRequest(service="vitcache.v1.VitCache"), timeout=10)
    assert check.status == health_pb2.HealthCheckResponse.SERVING


@FUZZ
@given(batch=st.lists(images, min_size=1, max_size=6))
def test_malformed_images_get_per_image_errors_and_store_nothing(fuzz_target, batch) -> None:  # type: ignore[no-untyped-def]
    _check_answer(fuzz_target, pb.EncodeRequest(images=batch), len(batch))


@FUZZ
@given(request=pixel_batches())
def test_malformed_pixel_batches_are_refused_and_store_nothing(fuzz_target, request) -> None:  # type: ignore[no-untyped-def]
    _check_answer(fuzz_target, request, None)


def _key(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    if wire_type == 0:
        return _key(number, 0) + varint(int.from_bytes(payload[:4] or b"\0", "little"))
    if wire_type == 1:
        return _key(number, 1) + payload[:8].ljust(8, b"\0")
    if wire_type == 5:
        return _key(number, 5) + payload[:4].ljust(4, b"\0")
    if wire_type == 3:  # a group holding one field
        return _key(number, 3) + _field(number + 1, 0, payload) + _key(number, 4)
    return _key(number, 2) + varint(len(payload)) + payload


grids = st.lists(st.integers(0, 2**32 - 1), max_size=9)
pixel_chunks = st.tuples(grids, st.booleans(), st.binary(max_size=20)).map(
    lambda g: (
        b"".join(_field(2, 0, v.to_bytes(4, "little")) for v in g[0])  # unpacked
        if g[1]
        else pb.PixelBatch(image_grid_thw=g[0], pixel_values=pb.Tensor(data=g[2])).SerializeToString()
    )
)
records = st.one_of(
    images.map(lambda image: _field(1, 2, image.SerializeToString())),
    pixel_chunks.map(lambda chunk: _field(2, 2, chunk)),
    st.tuples(st.integers(1, 40), st.sampled_from([0, 1, 2, 3, 5]), st.binary(max_size=12))
    .filter(lambda f: not (f[0] in (1, 2) and f[1] == 2))  # those are images and pixel chunks, made above
    .map(lambda f: _field(*f)),  # unknown fields, and fields 1 and 2 of another wire type (unknown to protobuf)
)


@FUZZ
@given(parts=st.lists(records, max_size=8))
def test_the_request_walk_finds_what_protobuf_parses(parts) -> None:  # type: ignore[no-untyped-def]
    """``wire.fields`` splits a request as protobuf reads it, so counting from the wire counts the same items."""
    data = b"".join(parts)
    want = pb.EncodeRequest.FromString(data)
    found = fields([data], 100)
    images = [pb.Image.FromString(p) for n, kind, p in found if n == 1 and kind == LENGTH_DELIMITED]
    pixels = [p for n, kind, p in found if n == 2 and kind == LENGTH_DELIMITED]
    assert images == list(want.images)
    assert bool(pixels) == want.HasField("pixels")
    assert pb.PixelBatch.FromString(b"".join(pixels)) == want.pixels
    assert count_values(fields(pixels, 100), 2, 100) == len(want.pixels.image_grid_thw)


def _entry() -> CachedEmbedding:
    gen = torch.Generator().manual_seed(5)
    return CachedEmbedding.from_tensors((1, 4, 6), [torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen)])


damage = st.one_of(
    st.integers(0, 10_000).map(lambda n: ("truncate", n, 0)),
    st.tuples(st.integers(0, 10_000), st.integers(1, 255)).map(lambda t: ("flip", *t)),
    st.binary(min_size=1, max_size=16).map(lambda b: ("append", 0, b)),
)


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(how=damage)
def test_any_damage_to_a_stored_value_is_a_miss_never_a_wrong_answer(redis_server, encoder, how) -> None:  # type: ignore[no-untyped-def]
    value = _entry().to_value()
    kind, at, arg = how
    if kind == "truncate":
        damaged = value[: at % len(value)]
    elif kind == "flip":
        at %= len(value)
        damaged = value[:at] + bytes([value[at] ^ arg]) + value[at + 1 :]
    else:
        damaged = value + arg

    async def read_back() -> tuple[CachedEmbedding | None, int]:
        tier = RedisTier(redis_server.url, encoder.namespace)
        digest = b"\x01" * 16
        redis_server.client().set(tier.key(digest), damaged)
        try:
            return await tier.get(digest), tier.stats.corrupt
        finally:
            await tier.close()

    got, corrupt = asyncio.run(read_back())
    assert got is None and corrupt == 1  # every damage is caught, counted ...
    assert redis_server.client().dbsize() == 0  # ... and the damaged value dropped


def test_whatever_the_redis_client_raises_is_redis_unavailable(redis_server) -> None:  # type: ignore[no-untyped-def]
    """redis-py's cluster client has raised AttributeError from inside a command while a node died
    (tests/test_cluster.py, about one run in five): that must cost a miss, not the request."""

    async def run() -> None:
        tier = RedisTier(redis_server.url, "ns")
        try:
            assert await tier.ping() and tier.connected
            with pytest.raises(L2Unavailable, match="AttributeError"):
                await tier.execute(lambda client: client.no_such_command())
            assert not tier.connected and tier.stats.errors == 1
            assert await tier.get(b"\x01" * 16) is None  # backing off: a miss, without calling Redis
            assert tier.stats.errors == 1
        finally:
            await tier.close()

    asyncio.run(run())


def test_a_rewritten_grid_in_the_header_is_caught() -> None:
    """The checksum covers the header too: a stored value whose grid was changed (same length) is rejected."""
    value = _entry().to_value()
    assert b'"grid_thw":[1,4,6]' in value
    with pytest.raises(CorruptEntry, match="checksum"):
        CachedEmbedding.from_value(value.replace(b'"grid_thw":[1,4,6]', b'"grid_thw":[1,6,4]'))
