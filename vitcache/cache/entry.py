"""One cached image or video: its grid, output tensors (and a video's timing), and the binary value Redis stores.

Value layout (one Redis string)::

    b"VTC" + FORMAT_VERSION (1 byte) + header length (uint32 LE) + header (JSON) + payload

The header names the grid, each output's dtype, shape and byte length, and the xxh3-64 of
the rest of the header (canonical JSON) followed by the payload, so a damaged grid or shape
is caught like damaged tensor bytes. :meth:`CachedEmbedding.from_value` checks every part and raises
:class:`CorruptEntry` on any mismatch, so a damaged or foreign value is a miss, never a
wrong answer.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import xxhash

from vitcache.wire.tensor_codec import TensorBytes, check_layout
from vitcache.wire.timing import VideoTiming

if TYPE_CHECKING:
    import torch

_MAGIC = b"VTC"
FORMAT_VERSION = 2  # 2: the checksum covers the header's grid and output specs too
_PREFIX = struct.Struct("<3sBI")


class CorruptEntry(ValueError):
    """A stored value failed its header or checksum check."""


def _checksum(meta: dict, payload: Iterable[bytes | memoryview]) -> str:
    """xxh3-64 (hex) of the header's canonical JSON (without the checksum) and the payload."""
    checksum = xxhash.xxh3_64(json.dumps(meta, separators=(",", ":")).encode())
    for chunk in payload:
        checksum.update(chunk)
    return checksum.hexdigest()


@dataclass(frozen=True)
class CachedEmbedding:
    grid_thw: tuple[int, int, int]
    outputs: tuple[TensorBytes, ...]
    video: VideoTiming | None = None  # a video's timing; None for an image

    @property
    def nbytes(self) -> int:
        return sum(out.nbytes for out in self.outputs)

    @classmethod
    def from_tensors(cls, grid_thw: tuple[int, int, int], tensors: list[torch.Tensor]) -> CachedEmbedding:
        return cls(tuple(grid_thw), tuple(TensorBytes.from_tensor(t) for t in tensors))

    def tensors(self) -> list[torch.Tensor]:
        return [out.to_tensor() for out in self.outputs]

    def to_value(self) -> bytes:
        meta: dict = {
            "grid_thw": list(self.grid_thw),
            "outputs": [{"dtype": o.dtype, "shape": list(o.shape), "nbytes": o.nbytes} for o in self.outputs],
        }
        if self.video is not None:
            meta["video"] = self.video.to_json()
        checksum = _checksum(meta, (out.data for out in self.outputs))
        header = json.dumps({**meta, "xxh3_64": checksum}, separators=(",", ":")).encode()
        prefix = _PREFIX.pack(_MAGIC, FORMAT_VERSION, len(header))
        return b"".join([prefix, header, *(out.data for out in self.outputs)])

    @classmethod
    def from_value(cls, value: bytes) -> CachedEmbedding:
        """Parses a stored value; the outputs are views of ``value`` (no copy)."""
        try:
            magic, version, header_len = _PREFIX.unpack_from(value)
            if magic != _MAGIC or version != FORMAT_VERSION:
                raise CorruptEntry(f"unknown format {magic!r} v{version}")
            start = _PREFIX.size + header_len
            header = json.loads(value[_PREFIX.size : start])
            grid = tuple(int(x) for x in header["grid_thw"])
            if len(grid) != 3:
                raise CorruptEntry("grid must have 3 values")
            view = memoryview(value)
            outputs = []
            for spec in header["outputs"]:
                end = start + int(spec["nbytes"])
                if end > len(value):
                    raise CorruptEntry("payload shorter than its header says")
                out = TensorBytes(str(spec["dtype"]), tuple(int(d) for d in spec["shape"]), view[start:end])
                check_layout(out.data, out.dtype, out.shape)
                outputs.append(out)
                start = end
            if start != len(value):
                raise CorruptEntry("trailing bytes after the payload")
            meta = {"grid_thw": header["grid_thw"], "outputs": header["outputs"]}
            if "video" in header:
                meta["video"] = header["video"]
            if _checksum(meta, (out.data for out in outputs)) != header["xxh3_64"]:
                raise CorruptEntry("checksum mismatch")
            video = VideoTiming.from_json(header["video"]) if "video" in header else None
            return cls(grid, tuple(outputs), video)  # type: ignore[arg-type]
        except CorruptEntry:
            raise
        except (struct.error, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CorruptEntry(f"malformed entry: {exc}") from exc
