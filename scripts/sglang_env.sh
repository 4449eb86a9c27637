#!/usr/bin/env bash
# Creates .venv-sglang: the released sglang (integrations/requirements-sglang.lock, all --no-deps) on top of .venv,
# whose packages (torch, vitcache editable, pytest, ...) it sees through a .pth file, so the SGLang tests
# (tests/sglang/) run against sglang's own code without a second torch. Needs .venv (scripts/bootstrap.sh).
# vitcache is installed editable here too, so its package map and SGLang plugin entry point are this tree's.
# Idempotent: does nothing when the lock, pyproject.toml, this script and .venv's location have not changed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    echo "sglang_env: .venv is missing; run scripts/bootstrap.sh first" >&2
    exit 1
fi
base_site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
stamp=.venv-sglang/.vitcache-sglang-env
want=$( (cat integrations/requirements-sglang.lock pyproject.toml scripts/sglang_env.sh; echo "$base_site") |
    .venv/bin/python -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
echo "sglang_env: creating .venv-sglang (about a minute)" >&2
rm -rf .venv-sglang
.venv/bin/python -m venv --without-pip .venv-sglang
site=$(.venv-sglang/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# addsitedir (not a bare path line) so .venv's own .pth files (vitcache's editable finder) are processed too.
echo "import site; site.addsitedir('$base_site')" > "$site/_vitcache_base_venv.pth"
# .venv's pip installs into .venv-sglang's prefix; --no-deps keeps it from touching what .venv provides.
.venv/bin/python -m pip --python .venv-sglang/bin/python install -q --no-deps -r integrations/requirements-sglang.lock
.venv/bin/python -m pip --python .venv-sglang/bin/python install -q --no-deps --no-build-isolation -e .
echo "$want" > "$stamp"
