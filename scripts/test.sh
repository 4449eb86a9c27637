#!/usr/bin/env bash
# Runs lint and the whole test suite (starts its own redis-server and gRPC servers on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
scripts/install_browser.sh  # chromium for the dashboard's browser test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
