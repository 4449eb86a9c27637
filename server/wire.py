"""Protobuf's wire format by hand where its Python API costs too much.

The hit path's serializer: ImageResult bytes with one copy of each tensor, not three.

protobuf's Python API copies a ``bytes`` field when it is assigned and again (through a
growing buffer) when the message is serialized; for a 1.8 MB embedding that costs more
than the whole gRPC transfer. Here the message is serialized by protobuf without its
tensors' data, and each tensor is appended as its own ``embeddings`` field, framed around
the cached bytes, so the single ``b"".join`` is the only copy between L1 and gRPC.
Appending fields to a serialized message is how protobuf defines merging, so a standard
parser reads exactly the message that ``service.image_result`` builds (tested).

Requests come without a deserializer: Encode, Fetch and Put get the message's bytes, and
``fields`` walks its top level without parsing or copying anything, so a count limit is checked
from the wire before protobuf allocates an object per item (2 MB of empty ``Image`` s are a
million of them).
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from vitcache.v1 import vitcache_pb2 as pb
from vitcache.v1 import vitcache_pb2_grpc as pb_grpc

from vitcache.wire.tensor_codec import TensorBytes

# Protobuf wire types.
VARINT, _FIXED64, LENGTH_DELIMITED, _START_GROUP, _END_GROUP, _FIXED32 = range(6)
_FIXED_SIZE = {_FIXED64: 8, _FIXED32: 4}
_VARINT_END_BYTES = bytes(range(0x80))  # a varint's last byte, the only one without the high bit
_EMBEDDINGS = pb.ImageResult.DESCRIPTOR.fields_by_name["embeddings"].number
_TENSOR_DATA = pb.Tensor.DESCRIPTOR.fields_by_name["data"].number
#: RPCs whose servicer methods yield pre-serialized ImageResult bytes.
_PRESERIALIZED = ("Encode", "Fetch")
#: RPCs whose servicer methods take the request's bytes and parse them (counts first).
_RAW_REQUESTS = ("Encode", "Fetch", "Put")


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


#: A field as ``fields`` finds it: (number, wire type, payload of a length-delimited one).
Field = tuple[int, int, memoryview | None]


class MalformedMessage(ValueError):
    """Bytes that are not a protobuf message."""


class TooManyFields(ValueError):
    """A message with more fields than the walk was allowed to read."""


def _read_varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while shift < 64:
        if pos >= len(data):
            raise MalformedMessage("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise MalformedMessage("varint longer than 10 bytes")


def fields(chunks: Sequence[bytes | memoryview], max_fields: int) -> list[Field]:
    """The top-level fields of the message ``chunks`` concatenated make: (number, wire type, payload).

    ``payload`` is a view of a length-delimited field's bytes (None for the other wire types); groups
    are skipped whole. Reads at most ``max_fields`` fields, nested ones included, and raises
    TooManyFields past that, so the walk costs a bounded number of steps whatever the message holds.
    """
    found: list[Field] = []
    steps, open_groups = 0, []
    for chunk in chunks:
        data, pos = memoryview(chunk), 0
        while pos < len(data):
            steps += 1
            if steps > max_fields:
                raise TooManyFields(f"more than {max_fields} fields")
            key, pos = _read_varint(data, pos)
            number, wire_type = key >> 3, key & 7
            if number == 0:
                raise MalformedMessage("field number 0")
            payload = None
            if wire_type == VARINT:
                _, pos = _read_varint(data, pos)
            elif wire_type == LENGTH_DELIMITED:
                length, pos = _read_varint(data, pos)
                payload, pos = data[pos : pos + length], pos + length
            elif wire_type in _FIXED_SIZE:
                pos += _FIXED_SIZE[wire_type]
            elif wire_type == _START_GROUP:
                open_groups.append(number)
            elif wire_type == _END_GROUP:
                if not open_groups or open_groups.pop() != number:
                    raise MalformedMessage(f"unmatched end of group {number}")
            else:
                raise MalformedMessage(f"wire type {wire_type}")
            if pos > len(data):
                raise MalformedMessage("truncated field")
            if not open_groups and wire_type != _END_GROUP:
                found.append((number, wire_type, payload))
        if open_groups:
            raise MalformedMessage(f"unterminated group {open_groups[-1]}")
    return found


def count_values(found: Sequence[Field], number: int, limit: int) -> int:
    """How many values the repeated varint field ``number`` holds in ``found``, packed or not.

    Past ``limit`` it stops counting and returns some number over it; packed values are counted in C.
    """
    count = 0
    for field_number, wire_type, payload in found:
        if field_number != number:
            continue
        if wire_type == VARINT:
            count += 1
        elif payload is not None and len(payload) > 10 * limit:  # varints take at most 10 bytes
            count += len(payload) // 10 + 1
        elif payload is not None:
            count += len(payload) - len(payload.tobytes().translate(None, _VARINT_END_BYTES))
        if count > limit:
            break
    return count


def _field_header(number: int, length: int) -> bytes:
    """Tag and length of a length-delimited field."""
    return varint(number << 3 | LENGTH_DELIMITED) + varint(length)


def with_tensors(message: pb.ImageResult, tensors: Sequence[TensorBytes]) -> bytes:
    """``message`` serialized, plus ``tensors`` appended to its ``embeddings`` in order."""
    parts: list[bytes | memoryview] = [message.SerializeToString()]
    for tensor in tensors:
        meta = pb.Tensor(dtype=tensor.dtype, shape=tensor.shape).SerializeToString()
        data_header = _field_header(_TENSOR_DATA, tensor.nbytes)
        parts += [_field_header(_EMBEDDINGS, len(meta) + len(data_header) + tensor.nbytes), meta, data_header]
        parts.append(tensor.data)
    return b"".join(parts)


def _serialize(result: bytes | pb.ImageResult) -> bytes:
    return result if isinstance(result, bytes) else result.SerializeToString()


class _HandlerRecorder:
    """Stands in for a server to capture the generated code's method handlers."""

    handlers: dict[str, grpc.RpcMethodHandler]

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.handlers = handlers


def add_servicer(servicer: pb_grpc.VitCacheServicer, server: grpc.aio.Server) -> None:
    """``add_VitCacheServicer_to_server``, with Encode, Fetch and Put taking the request's bytes (the
    servicer parses them), and Encode and Fetch sending bytes as they are yielded.

    Every other RPC (and any added to the proto later) keeps the generated handler.
    """
    recorder = _HandlerRecorder()
    pb_grpc.add_VitCacheServicer_to_server(servicer, recorder)
    handlers = dict(recorder.handlers)
    for name in _RAW_REQUESTS:
        handlers[name] = handlers[name]._replace(request_deserializer=None)
    for name in _PRESERIALIZED:
        handlers[name] = handlers[name]._replace(response_serializer=_serialize)
    service = pb.DESCRIPTOR.services_by_name["VitCache"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)
