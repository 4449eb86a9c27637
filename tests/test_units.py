"""Digests, the stored value format and the L1 bound."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from vitcache.cache.entry import CachedEmbedding, CorruptEntry
from vitcache.cache.l1 import L1Cache
from vitcache.digest import DIGEST_SIZE, digest_file, digest_pixels, digest_rgb
from vitcache.wire.tensor_codec import TensorBytes, tensor_from_buffer


def test_digest_covers_geometry_and_kind() -> None:
    pixels = bytes(range(256)) * (30 * 100 * 3 // 256) + bytes(30 * 100 * 3 % 256)
    assert len(digest_rgb(pixels, 30, 100)) == DIGEST_SIZE
    # Same bytes, transposed geometry: must not collide (vLLM CVE-2025-46722).
    assert digest_rgb(pixels, 30, 100) != digest_rgb(pixels, 100, 30)
    # The same bytes as a file, as raw pixels and as pixel rows are three different inputs.
    assert len({digest_file(pixels), digest_rgb(pixels, 30, 100), digest_pixels(pixels, (1, 30, 100), "uint8", 3)}) == 3
    assert digest_pixels(pixels, (1, 30, 100), "uint8", 3) != digest_pixels(pixels, (1, 100, 30), "uint8", 3)
    assert digest_pixels(pixels, (1, 30, 100), "uint8", 3) != digest_pixels(pixels, (1, 30, 100), "int8", 3)
    # Deterministic, and sensitive to one byte.
    assert digest_file(b"abc") == digest_file(b"abc") != digest_file(b"abd")


def test_digest_is_documented_xxh3_128() -> None:
    import xxhash

    assert digest_rgb(b"\x01\x02\x03", 1, 1) == xxhash.xxh3_128(b"vitcache.v1\0rgb8\x001x1\0\x01\x02\x03").digest()


def _entry(seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> CachedEmbedding:
    gen = torch.Generator().manual_seed(seed)
    merged = torch.randn(6, 8, generator=gen).to(dtype)
    deep = torch.randn(6, 8, generator=gen).to(dtype)
    return CachedEmbedding.from_tensors((1, 4, 6), [merged, deep])


def test_value_round_trip_is_exact() -> None:
    entry = _entry()
    back = CachedEmbedding.from_value(entry.to_value())
    assert back.grid_thw == (1, 4, 6)
    assert [bytes(o.data) for o in back.outputs] == [bytes(o.data) for o in entry.outputs]
    for got, want in zip(back.tensors(), entry.tensors(), strict=True):
        assert got.dtype == torch.bfloat16 and torch.equal(got, want)


@pytest.mark.parametrize(
    "damage",
    [
        lambda v: v[:-1],  # truncated payload
        lambda v: v + b"x",  # trailing bytes
        lambda v: v[:-1] + bytes([v[-1] ^ 1]),  # one bit of payload
        lambda v: b"XYZ" + v[3:],  # magic
        lambda v: v[:3] + b"\x09" + v[4:],  # format version
        lambda v: v[:4] + struct.pack("<I", 10**6) + v[8:],  # header length
        lambda v: v[:10] + b"{" + v[11:],  # header JSON
        lambda v: b"",
        lambda v: b"\x00" * 3,
    ],
)
def test_damaged_values_are_rejected(damage) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(CorruptEntry):
        CachedEmbedding.from_value(damage(_entry().to_value()))


def test_tensor_views_are_zero_copy_and_checked() -> None:
    tensor = torch.arange(12, dtype=torch.float32).view(3, 4)
    data = TensorBytes.from_tensor(tensor)
    view = data.to_tensor()
    assert torch.equal(view, tensor)
    assert view.data_ptr() == np.frombuffer(data.data, np.uint8).ctypes.data  # a view, not a copy
    with pytest.raises(ValueError, match="do not hold"):
        tensor_from_buffer(data.data, "float32", (4, 4))
    with pytest.raises(ValueError, match="unsupported dtype"):
        tensor_from_buffer(data.data, "complex64", (3, 4))


def test_l1_is_bounded_in_bytes_and_evicts_least_recent() -> None:
    entries = {bytes([i]) * 16: _entry(i) for i in range(4)}
    size = next(iter(entries.values())).nbytes
    l1 = L1Cache(capacity_bytes=3 * size)
    keys = list(entries)
    for key in keys[:3]:
        assert l1.put(key, entries[key])
    assert l1.get(keys[0]) is entries[keys[0]]  # refresh 0, so 1 is the least recent
    l1.put(keys[3], entries[keys[3]])
    assert l1.get(keys[1]) is None
    assert {k for k in keys if l1.get(k) is not None} == {keys[0], keys[2], keys[3]}
    assert l1.bytes_used == 3 * size <= l1.capacity_bytes
    assert l1.evictions == 1
    # Replacing a held key does not double count; an entry larger than the cache is refused.
    l1.put(keys[0], entries[keys[0]])
    assert l1.bytes_used == 3 * size and len(l1) == 3
    assert not L1Cache(size - 1).put(keys[0], entries[keys[0]])
