"""Tensors as (dtype name, shape, little-endian bytes): the only form embeddings travel in.

Decoding builds CPU tensors that are views of the received buffer (no copy) and never
touches CUDA, so tensor-parallel workers can import this without opening a device context.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass

import torch

_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
    "uint8": torch.uint8,
    "int32": torch.int32,
    "int64": torch.int64,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}

assert sys.byteorder == "little", "vitcache's wire format is little-endian"


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype}") from None


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
        cpu = tensor.detach().to("cpu").contiguous()
        data = cpu.view(torch.uint8).numpy().tobytes() if cpu.numel() else b""
        return cls(dtype_name(cpu.dtype), tuple(cpu.shape), data)

    def to_tensor(self) -> torch.Tensor:
        """A CPU tensor viewing ``data`` (no copy); read-only in spirit, ``.clone()`` to modify."""
        return tensor_from_buffer(self.data, self.dtype, self.shape)


def tensor_from_buffer(data: bytes | memoryview, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    torch_dtype = dtype_from_name(dtype)
    numel = 1
    for dim in shape:
        if dim < 0:
            raise ValueError(f"negative dimension in shape {shape}")
        numel *= dim
    itemsize = torch_dtype.itemsize
    if len(data) != numel * itemsize:
        raise ValueError(f"{len(data)} bytes do not hold a {dtype} tensor of shape {list(shape)}")
    if numel == 0:
        return torch.empty(shape, dtype=torch_dtype)
    with warnings.catch_warnings():
        # frombuffer warns that bytes are immutable; the views are documented read-only.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=torch_dtype).view(shape)
