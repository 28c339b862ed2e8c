#!/usr/bin/env bash
# Install lmtune (editable) and what it needs. torch comes first: a plain `torch` requirement
# on a machine without torch would pull a multi-GB CUDA build where a CPU one is wanted.
#   bash scripts/setup.sh          # lmtune + web/API extras
#   bash scripts/setup.sh --test   # also the test tools and Debian's chromium (browser test)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import torch" 2>/dev/null; then
    $PY -m pip install --quiet "torch==2.13.0" || $PY -m pip install --quiet torch
fi
extras="serve"
if [[ "${1:-}" == "--test" ]]; then
    extras="serve,test"
fi
$PY -m pip install --quiet -e ".[${extras}]"
if [[ "${1:-}" == "--test" ]]; then
    # The optional engines the tests exercise on CPU: 4/8-bit (bitsandbytes) and DeepSpeed ZeRO.
    $PY -m pip install --quiet "bitsandbytes==0.50.2"
    DS_BUILD_OPS=0 $PY -m pip install --quiet "deepspeed==0.19.8"
fi
if [[ "${1:-}" == "--test" ]] && ! command -v chromium >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
            || echo "setup: could not install chromium; the browser test will say so" >&2
    fi
fi
echo "setup: done ($($PY -c 'import lmtune; print("lmtune", lmtune.__version__)'))"
