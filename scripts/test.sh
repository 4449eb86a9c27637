#!/usr/bin/env bash
# Runs lint and the whole test suite (starts its own redis-server and gRPC servers on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
scripts/install_test_packages.sh  # chromium (dashboard test), a TLS-capable redis-server
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest "$@"
# SGLang integration tests, against the released sglang in its own venv (tests/sglang/conftest.py says why).
sglang_start=$SECONDS
scripts/sglang_env.sh
.venv-sglang/bin/python -m pytest -q --confcutdir=tests/sglang tests/sglang
echo "sglang: environment and tests took $((SECONDS - sglang_start)) s"
scripts/test_vllm.sh  # vLLM 0.33.0 in .venv-vllm: its EC connector unit suite and tests_vllm/, each timed
