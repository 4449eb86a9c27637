#!/usr/bin/env bash
# Regenerates the Python modules of the vitcache.v1 API (committed, like grpc's route_guide).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I proto --python_out=proto --pyi_out=proto --grpc_python_out=proto \
    proto/vitcache/v1/vitcache.proto
