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
``vfile``  ``{sampling}``                          a video file's bytes
``vrgb8``  ``{t}x{h}x{w}:{sampling}:{seconds}``    uint8 THWC RGB frames
=========  =====================================  ==================================

``{sampling}`` is ``VideoSampling.header()`` (fps, frame count, pixel bounds a request chose), so
one file sampled two ways has two digests; ``{seconds}`` the frames' timestamps (``float.hex``,
comma-separated). A video's ``pixel_values_videos`` rows are ``pix`` like an image's: the tower
computes the same from the same rows and grid.

Geometry is part of the hashed bytes, so two images with the same pixel bytes but other
shapes (a 30x100 and a 100x30) never share a digest (cf. vLLM CVE-2025-46722), and the kinds
never collide with each other. The digest names the *input*; the server's cache key
adds the model namespace (weights, config, dtype, preprocessing) on top.

Keyed mode (``key``, the server's ``--digest-key-file``): the same canonical bytes go
through BLAKE2b-128 keyed with a deployment secret instead of xxh3-128. xxh3 is fast but no
MAC: anyone can compute it and so search for two images with one digest, which would let
one user's image be answered with another's embeddings. python-xxhash offers only a 64-bit
seed (no custom secret), and a seeded non-cryptographic hash gives no guarantee against
crafted collisions, so the keyed mode uses a real keyed hash from the standard library.
Without the key nobody can compute a digest, let alone collide one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import xxhash

DIGEST_SIZE = 16
MIN_KEY_BYTES = 16
_PREFIX = b"vitcache.v1\0"


def load_digest_key(path: str | Path) -> bytes:
    """The BLAKE2b key derived from a secret file (any length >= 16 bytes; surrounding whitespace ignored)."""
    secret = Path(path).read_bytes().strip()
    if len(secret) < MIN_KEY_BYTES:
        raise ValueError(f"digest key file {path} holds {len(secret)} bytes; use at least {MIN_KEY_BYTES}")
    return hashlib.blake2b(secret, digest_size=32, person=b"vitcache.key").digest()


def _digest(kind: bytes, header: bytes, payload: Iterable[bytes | memoryview], key: bytes | None) -> bytes:
    h = xxhash.xxh3_128() if key is None else hashlib.blake2b(key=key, digest_size=DIGEST_SIZE)
    h.update(_PREFIX + kind + b"\0" + header + b"\0")
    for chunk in payload:
        h.update(chunk)
    return h.digest()


def digest_file(data: bytes | memoryview, key: bytes | None = None) -> bytes:
    """Digest of an encoded image file (JPEG, PNG, ...), over its exact bytes."""
    return _digest(b"file", b"", (data,), key)


def digest_rgb(rgb: bytes | memoryview, height: int, width: int, key: bytes | None = None) -> bytes:
    """Digest of raw uint8 HWC RGB pixels of the given geometry."""
    return _digest(b"rgb8", f"{height}x{width}".encode(), (rgb,), key)


def digest_pixels(
    rows: bytes | memoryview, grid_thw: tuple[int, int, int], dtype: str, row_width: int, key: bytes | None = None
) -> bytes:
    """Digest of one image's preprocessed ``pixel_values`` rows (t*h*w rows of ``row_width``)."""
    t, h, w = grid_thw
    return _digest(b"pix", f"{t}x{h}x{w}:{dtype}:{row_width}".encode(), (rows,), key)


def digest_video_file(data: bytes | memoryview, sampling: str, key: bytes | None = None) -> bytes:
    """Digest of an encoded video file sampled with the settings ``sampling`` (``VideoSampling.header()``)."""
    return _digest(b"vfile", sampling.encode(), (data,), key)


def digest_video_frames(
    rgb: bytes | memoryview,
    frames: int,
    height: int,
    width: int,
    timestamps: Iterable[float],
    sampling: str,
    key: bytes | None = None,
) -> bytes:
    """Digest of raw uint8 THWC RGB video frames, their timestamps and sampling settings."""
    seconds = ",".join(float(s).hex() for s in timestamps)
    return _digest(b"vrgb8", f"{frames}x{height}x{width}:{sampling}:{seconds}".encode(), (rgb,), key)
