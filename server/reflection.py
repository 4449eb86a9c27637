"""Server reflection under both names: ``grpc.reflection.v1`` (what current tools ask first) and v1alpha.

grpcio-reflection ships only v1alpha. v1 is the same protocol under another package name (its
messages and field numbers are v1alpha's), so one v1alpha servicer answers both services; v1's
file descriptor, v1alpha's renamed, goes into the default pool so that reflection can describe
its own v1 service too.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

V1ALPHA_SERVICE = reflection.SERVICE_NAME
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE = f"{V1_PACKAGE}.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"


def _renamed(type_name: str, old_package: str) -> str:
    return type_name.replace(f".{old_package}.", f".{V1_PACKAGE}.", 1)


def _rename_types(message: descriptor_pb2.DescriptorProto, old_package: str) -> None:
    for field in message.field:
        if field.type_name:  # a message or enum field
            field.type_name = _renamed(field.type_name, old_package)
    for nested in message.nested_type:
        _rename_types(nested, old_package)


def add_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    """Adds v1's reflection.proto (v1alpha's under v1's names) to ``pool``, once."""
    try:
        pool.FindFileByName(V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old_package = proto.package
    proto.name, proto.package = V1_FILE, V1_PACKAGE
    proto.ClearField("options")  # v1alpha's Java and C# package names
    for message in proto.message_type:
        _rename_types(message, old_package)
    for service in proto.service:
        for method in service.method:
            method.input_type = _renamed(method.input_type, old_package)
            method.output_type = _renamed(method.output_type, old_package)
    pool.AddSerializedFile(proto.SerializeToString())


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serves reflection of ``service_names`` and of itself, as v1 and as v1alpha."""
    add_v1_descriptor(descriptor_pool.Default())
    servicer = reflection.aio.ReflectionServicer((*service_names, V1_SERVICE, V1ALPHA_SERVICE))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1_info = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE, {"ServerReflectionInfo": v1_info}),)
    )
