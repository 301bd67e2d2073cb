#!/usr/bin/env bash
# The TPU platform's tests on XLA's CPU device (PJRT_DEVICE=CPU), in a second virtual
# environment: torch-xla 2.9 pins torch 2.9, the main one has torch 2.13. Reuses the
# environment when it already holds that pair (a second run only reinstalls tessellm's
# packages); builds it from scratch otherwise (the download is ~7 GB: torch's CUDA
# dependencies come with the PyPI wheel, about 2.5 minutes here).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${TESSELLM_TPU_VENV:-.venv-tpu}
torch_version=2.9.0
start=$SECONDS

have_pair() {
    "$venv/bin/python" - "$torch_version" <<'EOF' 2>/dev/null
import importlib.metadata as md
import sys

wanted = sys.argv[1]
assert md.version("torch").split("+")[0] == wanted
assert md.version("torch-xla").split("+")[0] == wanted
EOF
}

if ! have_pair; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q "torch==$torch_version" "torch-xla==$torch_version"
fi
# tessellm's packages for this path, with their dependencies (torch 2.9 satisfies them).
"$venv/bin/python" -m pip install -q -e ./core -e ./platform_tpu -e ./plugins/attention_torch \
    -e ./plugins/llama "pytest>=8"
echo "tpu venv ready in $((SECONDS - start)) s"

# XLA's CPU device stands in for a TPU; each test module sets it too where no TPU is.
PJRT_DEVICE=CPU "$venv/bin/python" -m pytest -q -p no:cacheprovider platform_tpu/tests
echo "tpu tests done in $((SECONDS - start)) s"
