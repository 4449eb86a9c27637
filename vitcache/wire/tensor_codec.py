"""Tensors as (dtype name, shape, little-endian bytes): the only form embeddings travel in.

Decoding builds CPU tensors that are views of the received buffer (no copy) and never
touches CUDA, so tensor-parallel workers can import this without opening a device context.
torch is imported only where a tensor is made or read: checking a (dtype, shape, bytes) triple needs
none, so gRPC front-end processes (``--frontends``) run without loading it.
"""

from __future__ import annotations

import functools
import sys
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: Bytes per element of each dtype the wire carries, by name.
ITEMSIZES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8, "uint8": 1, "int32": 4, "int64": 8}

assert sys.byteorder == "little", "vitcache's wire format is little-endian"


@functools.cache
def _torch_dtypes() -> dict[str, torch.dtype]:
    import torch

    return {name: getattr(torch, name) for name in ITEMSIZES}


def itemsize(name: str) -> int:
    """Bytes per element of dtype ``name``; ValueError for a dtype the wire does not carry."""
    try:
        return ITEMSIZES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; expected one of {sorted(ITEMSIZES)}") from None


def dtype_from_name(name: str) -> torch.dtype:
    itemsize(name)
    return _torch_dtypes()[name]


def dtype_name(dtype: torch.dtype) -> str:
    for name, known in _torch_dtypes().items():
        if known == dtype:
            return name
    raise ValueError(f"unsupported dtype {dtype}")


def check_layout(data: bytes | memoryview, dtype: str, shape: tuple[int, ...]) -> int:
    """The element count of a ``dtype`` tensor of ``shape``; ValueError unless ``data`` holds exactly one."""
    size = itemsize(dtype)
    numel = 1
    for dim in shape:
        if dim < 0:
            raise ValueError(f"negative dimension in shape {shape}")
        numel *= dim
    if len(data) != numel * size:
        raise ValueError(f"{len(data)} bytes do not hold a {dtype} tensor of shape {list(shape)}")
    return numel


@dataclass(frozen=True)
class TensorBytes:
    """A CPU tensor's bytes with the metadata needed to view them again."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes | memoryview

    @property
    def nbytes(self) -> int:
        return len(self.data)

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor) -> TensorBytes:
        """Copies a tensor (any device) to CPU bytes in its own dtype."""
        import torch

        cpu = tensor.detach().to("cpu").contiguous()
        data = cpu.view(torch.uint8).numpy().tobytes() if cpu.numel() else b""
        return cls(dtype_name(cpu.dtype), tuple(cpu.shape), data)

    def to_tensor(self) -> torch.Tensor:
        """A CPU tensor viewing ``data`` (no copy); read-only in spirit, ``.clone()`` to modify."""
        return tensor_from_buffer(self.data, self.dtype, self.shape)


def tensor_from_buffer(data: bytes | memoryview, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    import torch

    numel = check_layout(data, dtype, shape)
    torch_dtype = dtype_from_name(dtype)
    if numel == 0:
        return torch.empty(shape, dtype=torch_dtype)
    with warnings.catch_warnings():
        # frombuffer warns that bytes are immutable; the views are documented read-only.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=torch_dtype).view(shape)
