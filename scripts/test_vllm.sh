#!/usr/bin/env bash
# vLLM 0.33.0's environment (scripts/vllm_env.sh), then vLLM's own EC connector unit suite and our connector's tests
# (tests_vllm/, against a real vitcache server from .venv), each with its time.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
scripts/vllm_env.sh
echo "vllm: environment $((SECONDS - start)) s"
start=$SECONDS
(cd .venv-vllm/vllm-src && ../bin/python -m pytest -q -p no:cacheprovider -W ignore tests/v1/ec_connector/unit)
echo "vllm: vLLM's tests/v1/ec_connector/unit $((SECONDS - start)) s"
start=$SECONDS
.venv-vllm/bin/pytest -q -p no:cacheprovider -o addopts="-ra --strict-markers" tests_vllm
echo "vllm: tests_vllm $((SECONDS - start)) s"
