"""Content digests: the one definition shared by the server and the client.

A digest is xxh3-128 (16 bytes, big-endian as ``xxhash.xxh3_128().digest()`` gives it) over
a canonical byte string::

    b"vitcache.v1\\0" + KIND + b"\\0" + HEADER + b"\\0" + PAYLOAD

=========  =====================================  ==================================
KIND       HEADER (ASCII)                          PAYLOAD
=========  =====================================  ==================================
``file``   (empty)                                 the encoded file's bytes
``rgb8``   ``{height}x{width}``                    uint8 HWC RGB pixels
``pix``    ``{t}x{h}x{w}:{dtype}:{row_width}``     one image's pixel_values rows (C order)
=========  =====================================  ==================================

Geometry is part of the hashed bytes, so two images with the same pixel bytes but other
shapes (a 30x100 and a 100x30) never share a digest (cf. vLLM CVE-2025-46722), and the three
kinds never collide with each other. The digest names the *input*; the server's cache key
adds the model namespace (weights, config, dtype, preprocessing) on top.
"""

from __future__ import annotations

from collections.abc import Iterable

import xxhash

DIGEST_SIZE = 16
_PREFIX = b"vitcache.v1\0"


def _digest(kind: bytes, header: bytes, payload: Iterable[bytes | memoryview]) -> bytes:
    h = xxhash.xxh3_128()
    h.update(_PREFIX + kind + b"\0" + header + b"\0")
    for chunk in payload:
        h.update(chunk)
    return h.digest()


def digest_file(data: bytes | memoryview) -> bytes:
    """Digest of an encoded image file (JPEG, PNG, ...), over its exact bytes."""
    return _digest(b"file", b"", (data,))


def digest_rgb(rgb: bytes | memoryview, height: int, width: int) -> bytes:
    """Digest of raw uint8 HWC RGB pixels of the given geometry."""
    return _digest(b"rgb8", f"{height}x{width}".encode(), (rgb,))


def digest_pixels(rows: bytes | memoryview, grid_thw: tuple[int, int, int], dtype: str, row_width: int) -> bytes:
    """Digest of one image's preprocessed ``pixel_values`` rows (t*h*w rows of ``row_width``)."""
    t, h, w = grid_thw
    return _digest(b"pix", f"{t}x{h}x{w}:{dtype}:{row_width}".encode(), (rows,))
