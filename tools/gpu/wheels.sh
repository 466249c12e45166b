#!/usr/bin/env bash
# Wheels for the offline CUDA machine: what `tools/gpu/check.sh` needs there that its image lacks.
#
# Why: the device machine reaches no package registry, and its image (Python 3.12, a CUDA torch,
# transformers, pandas, pyarrow, typer, ... : /work/.library/device/KINDS.md) has no zarr or datasets.
# check.sh installs every wheel in .whl/ (git-ignored) there without a resolver, so this downloads
# exactly the missing packages, each at the version this checkout's .venv runs (what CI tests), for the
# machine's Python and platform, and none of their needs that the image already has.
#
#   tools/gpu/wheels.sh [PYTHON_VERSION]      # default 3.12 (the device image's); or: just gpu-wheels
#
# Then carry .whl with the run (device `carry: [".whl"]`); it is a few MB.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

pyver=${1:-3.12}
py=${PYTHON:-.venv/bin/python}
# the image lacks these (zarr 3 and its codecs and config; datasets and its process pool)
packages=(zarr numcodecs donfig google-crc32c datasets dill multiprocess)
mapfile -t pins < <("$py" -c 'import sys
from importlib.metadata import version
for name in sys.argv[1:]:
    print(f"{name}=={version(name)}")' "${packages[@]}")
platforms=()
for tag in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 \
           manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
rm -rf .whl && mkdir .whl
echo "gpu-wheels: ${pins[*]} for Python $pyver (x86-64 Linux)"
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    "${platforms[@]}" -d .whl "${pins[@]}"
ls -1 .whl
echo "gpu-wheels: $(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/"
