#!/usr/bin/env bash
# Creates .venv-vllm: vLLM 0.33.0 (its CUDA wheel, --no-deps) beside CPU torch 2.13.0, vLLM's pure-Python
# requirements pinned in integrations/requirements-vllm.lock, torchvision 0.28.0 (its CUDA wheel: there is no CPU one
# for torch 2.13; scripts/torchvision_without_ops.py says how it imports), vitcache (editable, --no-deps), and the
# tests/v1/ec_connector/unit suite taken from vLLM's sdist into .venv-vllm/vllm-src. vLLM needs
# transformers<5.21, so it cannot share .venv. Idempotent: does nothing when its inputs have not changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv-vllm
stamp=$VENV/.vitcache-vllm-env
inputs=(scripts/vllm_env.sh scripts/torchvision_without_ops.py integrations/requirements-vllm.lock pyproject.toml
    tests_vllm/vllm_unit_conftest.py)
want=$(cat "${inputs[@]}" |
    "$PYTHON" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
echo "vllm_env: creating $VENV (first run takes a few minutes)" >&2
start=$SECONDS
[ -x $VENV/bin/python ] || "$PYTHON" -m venv $VENV
pip=($VENV/bin/python -m pip install -q --no-deps)
"${pip[@]}" torch==2.13.0  # the CPU build (a local wheel on these machines)
"${pip[@]}" vllm==0.33.0
"${pip[@]}" torchvision==0.28.0  # vLLM's Qwen processors import it (tests_vllm/test_vllm_video.py)
site=$($VENV/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
cp scripts/torchvision_without_ops.py "$site/"
echo "import torchvision_without_ops" > "$site/torchvision_without_ops.pth"
"${pip[@]}" -r integrations/requirements-vllm.lock
"${pip[@]}" --no-build-isolation -e .

# vLLM's own EC connector unit tests and the two files they import from outside tests/ (its sdist only).
SDIST_URL=https://files.pythonhosted.org/packages/f7/25/aa5684e9c59d6fc75f78926b7f15e8d9adc7de2d9e6e7575b80776ad8169/vllm-0.33.0.tar.gz
SDIST_SHA256=f4c33c2503d52bb411146afa9618a4f48bed68912f617e6803ac8d76e4c74112
rm -rf $VENV/vllm-src
mkdir -p $VENV/vllm-src
$VENV/bin/python - "$SDIST_URL" "$SDIST_SHA256" $VENV/vllm-src <<'EOF'
import hashlib, io, sys, tarfile, urllib.request
url, sha256, dest = sys.argv[1:]
data = urllib.request.urlopen(url, timeout=300).read()
if hashlib.sha256(data).hexdigest() != sha256:
    sys.exit(f"vllm_env: {url} does not have the pinned sha256 {sha256}")
wanted = ("tests/__init__.py", "tests/v1/__init__.py", "tests/v1/ec_connector/__init__.py",
          "tests/v1/ec_connector/unit/", "examples/disaggregated/disaggregated_encoder/disagg_epd_proxy.py")
with tarfile.open(fileobj=io.BytesIO(data)) as tar:
    members = []
    for member in tar.getmembers():
        member.name = member.name.split("/", 1)[1] if "/" in member.name else ""
        if member.name.startswith(wanted) and (member.isfile() or member.isdir()):
            members.append(member)
    tar.extractall(dest, members=members, filter="data")
EOF
cp tests_vllm/vllm_unit_conftest.py $VENV/vllm-src/conftest.py
echo "$want" > "$stamp"
echo "vllm_env: $VENV ready in $((SECONDS - start)) s" >&2
