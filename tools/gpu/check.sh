#!/usr/bin/env bash
# One-shot check and benchmark of surgery's CUDA paths on a bare CUDA machine that has only this repository.
#
# Why a script: GPU time is lent by the minute, so everything that needs a GPU to be believed runs in
# one go (under 8 minutes): set up .venv with a CUDA torch, generate a 2-layer checkpoint with
# MiniMax-M2's exact shapes in the hub FP8 layout (tools/gen_fullwidth.py), run `surgery calibrate`
# on CUDA (device tier, pinned staging, device dequant, chunked experts under a small --memory-budget,
# 2 ranks if there are 2 GPUs) and on the CPU (float32 reference), compare saliency, then calibrate at
# realistic size (>= 500k tokens), GPTQ of the pruned layers and a 62-layer extrapolation (tools/gpu/check.py,
# docs/benchmarks-gpu.md). Not part of CI.
#
#   tools/gpu/check.sh [check.py options, e.g. --experts 128 --out gpu-check.md]    # or: just gpu-check
#
#   tools/gpu/check.sh --simulate-on-cpu                                          # the rehearsal, no GPU needed
#
# Exit status: 0 all comparisons pass, 1 one failed (or set-up failed), 2 no CUDA here (one line, at once).
# Environment: PYTHON (interpreter that creates .venv, default python3), GPU_CHECK_VENV (default .venv).
# Offline machines: if PYTHON already has a CUDA torch (an image's own environment, itself perhaps a
# venv) the new .venv sees its packages through a .pth file instead of downloading torch; wheels for
# anything else missing can be put in .whl/ (git-ignored; `tools/gpu/wheels.sh` or `just gpu-wheels` downloads
# them where pip can reach PyPI) and are then installed from there alone.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

# --simulate-on-cpu (check.py's rehearsal at a tiny shape) rehearses this set-up too, on a machine
# without a GPU: every step below but the two that need CUDA
simulate=0
for arg in "$@"; do [ "$arg" = --simulate-on-cpu ] && simulate=1; done
if [ $simulate = 0 ] && { ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU'; }; then
    echo "gpu-check: no CUDA GPU here (nvidia-smi finds none); nothing to check"
    exit 2
fi

start=$(date +%s)
base=${PYTHON:-python3}
venv=${GPU_CHECK_VENV:-.venv}
py=$venv/bin/python
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
pip=("$py" -m pip install -q --retries 1 --timeout 20)
wheels=0
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    wheels=1
    pip+=(--no-index --find-links .whl)
fi
needed=(surgery zarr datasets typer transformers safetensors)
missing() {  # the modules of "${needed[@]}" this venv cannot import, each with why; status 1 if any
    "$py" -c 'import importlib, sys
bad = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as e:  # an image package too old for a carried wheel shows here, not at the run
        bad.append(f"{name} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e!r})")
print(", ".join(bad)); sys.exit(1 if bad else 0)' "${needed[@]}" 2>/dev/null
}

if [ ! -x "$py" ]; then
    echo "gpu-check: creating $venv with $base"
    "$base" -m venv "$venv"
    # the creating interpreter's packages (a CUDA torch above all) stay visible, after the venv's own:
    # `--system-site-packages` would not do it when $base is itself a venv (it points past it)
    if "$base" -c 'import torch' 2>/dev/null; then
        site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        "$base" -c 'import site, sys; print("\n".join(site.getsitepackages() + [site.getusersitepackages()]))' \
            > "$site/_gpu_check_parent.pth"
    fi
fi
# a CUDA torch: on Linux x86-64 PyPI's default torch wheel is the CUDA build (never the CPU index here)
if [ $simulate = 1 ]; then
    "$py" -c 'import torch' 2>/dev/null || { echo "gpu-check: $py has no torch (the rehearsal installs none)"; exit 1; }
elif ! "$py" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
    if "$py" -c 'import torch' 2>/dev/null; then
        echo "gpu-check: $venv has a CPU-only torch; installing PyPI's (CUDA) build"
        "${pip[@]}" --force-reinstall torch
    else
        echo "gpu-check: installing torch (CUDA build from PyPI)"
        "${pip[@]}" torch
    fi
fi
if ! lacking=$(missing); then
    if [ $wheels = 1 ]; then
        # offline: the wheels as they are (tools/gpu/wheels.sh made them for what the image lacks), without
        # the resolver, which would refuse the image's own versions of their needs; surgery itself runs
        # from this checkout (`python -m surgery` in its root), so it needs no install
        echo "gpu-check: installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into $venv (for: $lacking)"
        "$py" -m pip install -q --no-index --no-deps --no-compile .whl/*.whl || true
    else
        echo "gpu-check: installing surgery and its dependencies into $venv (for: $lacking)"
        "${pip[@]}" -e . || "${pip[@]}" --no-build-isolation -e . || true
    fi
    if ! lacking=$(missing); then
        echo "gpu-check: $venv still lacks: $lacking (offline? tools/gpu/wheels.sh puts their wheels in .whl/)"
        exit 1
    fi
fi
# the transformers this Python has must be one pyproject.toml allows (an image's own may not be): say which, and
# stop rather than measure the project against a version it does not support
if ! "$py" tools/gpu/transformers_check.py; then
    echo "gpu-check: put a supported transformers wheel in .whl/ (or install one) and run again"
    exit 1
fi
if [ $simulate = 0 ] && ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu-check: $("$py" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)') sees no GPU"
    exit 2
fi
echo "gpu-check: environment ready in $(( $(date +%s) - start )) s"
status=0
"$py" tools/gpu/check.py "$@" || status=$?
echo "gpu-check: $(( $(date +%s) - start )) s in all"
exit $status
