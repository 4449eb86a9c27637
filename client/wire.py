"""ImageResult messages read without copying their tensors.

protobuf's Python API copies a ``bytes`` field when it parses a message and again when the
field is read; for a 1.8 MB embedding that costs about as much CPU as receiving it. Here
each tensor's ``data`` is located in the received message and kept as a memoryview of it,
and only the rest of the message (a few dozen bytes) goes through protobuf's parser, so the
tensors the client returns view the bytes gRPC handed over.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from vitcache.v1 import vitcache_pb2 as pb
from vitcache.v1 import vitcache_pb2_grpc as pb_grpc

from vitcache.wire.tensor_codec import TensorBytes

_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5
_EMBEDDINGS = pb.ImageResult.DESCRIPTOR.fields_by_name["embeddings"].number
_TENSOR_DATA = pb.Tensor.DESCRIPTOR.fields_by_name["data"].number
_SERVICE = pb.DESCRIPTOR.services_by_name["VitCache"]
_RESULT_STREAMS = {"Encode": pb.EncodeRequest, "Fetch": pb.FetchRequest}


def _varint(view: memoryview, pos: int) -> tuple[int, int]:
    """(value, position after it)."""
    value = shift = 0
    while True:
        if pos >= len(view) or shift > 63:
            raise DecodeError("truncated or overlong varint")
        byte = view[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(view: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(number, wire type, field start, value start, value end) of each field in ``view[start:end]``."""
    pos = start
    while pos < end:
        key, value_start = _varint(view, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            value_end = _varint(view, value_start)[1]
        elif wire_type == _FIXED64:
            value_end = value_start + 8
        elif wire_type == _FIXED32:
            value_end = value_start + 4
        elif wire_type == _LENGTH_DELIMITED:
            length, value_start = _varint(view, value_start)
            value_end = value_start + length
        else:
            raise DecodeError(f"unsupported wire type {wire_type}")
        if value_end > end:
            raise DecodeError("field runs past the end of its message")
        yield number, wire_type, pos, value_start, value_end
        pos = value_end


def _tensor(view: memoryview, start: int, end: int) -> TensorBytes:
    meta: list[memoryview] = []
    data = view[start:start]
    for number, wire_type, field_start, value_start, value_end in _fields(view, start, end):
        if number == _TENSOR_DATA and wire_type == _LENGTH_DELIMITED:
            data = view[value_start:value_end]  # a repeated singular field: the last one wins
        else:
            meta.append(view[field_start:value_end])
    tensor = pb.Tensor.FromString(b"".join(meta))
    return TensorBytes(tensor.dtype, tuple(tensor.shape), data)


class ReceivedResult:
    """An ImageResult whose ``embeddings`` are :class:`TensorBytes` viewing the received bytes.

    Every other field reads through to the parsed rest of the message.
    """

    __slots__ = ("_message", "embeddings")

    def __init__(self, message: pb.ImageResult, embeddings: list[TensorBytes]) -> None:
        self._message = message
        self.embeddings = embeddings

    def __getattr__(self, name: str) -> Any:
        return getattr(self._message, name)


def decode_result(data: bytes) -> ReceivedResult:
    view = memoryview(data)
    rest: list[memoryview] = []
    embeddings: list[TensorBytes] = []
    for number, wire_type, field_start, value_start, value_end in _fields(view, 0, len(view)):
        if number == _EMBEDDINGS and wire_type == _LENGTH_DELIMITED:
            embeddings.append(_tensor(view, value_start, value_end))
        else:
            rest.append(view[field_start:value_end])
    return ReceivedResult(pb.ImageResult.FromString(b"".join(rest)), embeddings)


def result_stub(channel: grpc.Channel | grpc.aio.Channel) -> pb_grpc.VitCacheStub:
    """The generated stub, with Encode and Fetch yielding :class:`ReceivedResult`."""
    stub = pb_grpc.VitCacheStub(channel)
    for name, request in _RESULT_STREAMS.items():
        path = f"/{_SERVICE.full_name}/{name}"
        setattr(stub, name, channel.unary_stream(path, request.SerializeToString, decode_result))
    return stub
