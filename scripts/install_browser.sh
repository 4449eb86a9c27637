#!/usr/bin/env bash
# Installs Debian's chromium and chromium-driver for the dashboard's browser test when they are missing.
# Needs root and apt-get; without them (or if apt-get fails) it says so and the browser test skips
# with that reason. Never fails the caller.
set -uo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "install_browser: chromium or chromedriver missing; not root with apt-get, so the browser test will skip" >&2
    exit 0
fi
echo "install_browser: apt-get install chromium chromium-driver (first run only)" >&2
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends \
        chromium chromium-driver fonts-dejavu-core >/dev/null; }; then
    echo "install_browser: apt-get failed; the browser test will skip" >&2
fi
exit 0
