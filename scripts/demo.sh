#!/usr/bin/env bash
# Quick start: sets up .venv, starts a server on the built-in tiny-random model, encodes images twice.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python scripts/demo.py
