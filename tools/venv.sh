# Sourced by the check scripts (tools/serve/check.sh, tools/floor/check.sh): a venv of their own.
#
# ensure_venv VENV TEST PIP-ARGS...: unless `VENV/bin/python -c TEST` succeeds, (re)create VENV with the
# project's CPU torch first (a bare `torch` requirement would pull a multi-GB CUDA wheel), then PIP-ARGS.
TORCH_CPU=2.13.0

ensure_venv() {
    local venv=$1 test=$2
    shift 2
    if "$venv/bin/python" -c "$test" >/dev/null 2>&1; then
        return 0
    fi
    echo "creating $venv: torch $TORCH_CPU (CPU), $*"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q "torch==$TORCH_CPU"
    "$venv/bin/python" -m pip install -q "$@"
}
