#!/usr/bin/env bash
# On a lent GPU machine: install the carried wheels (.whl/) and this repo into /tmp/site.
# Usage: source bench/device_setup.sh
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/site-vitcache .
export PYTHONPATH=/tmp/site-vitcache:/tmp/site
export VITCACHE_REDIS_SERVER=$PWD/.whl/bin/redis-server VITCACHE_HOME=/tmp/vitcache-home PYTHONUNBUFFERED=1
set +e
