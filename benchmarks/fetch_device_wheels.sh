#!/usr/bin/env bash
# Download, here, the wheels the device check needs on a bare GPU machine (Python 3.12, x86-64, PyTorch
# preinstalled): zarr, dask and numcodecs with their pure dependencies, into .whl/ (ignore it in
# .git/info/exclude and carry it to the device). Versions are the ones this project is tested with.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for pkg in zarr==3.1.6 numcodecs==0.16.6 donfig google-crc32c dask==2026.8.0 partd locket toolz cloudpickle \
           fsspec pyyaml pydantic pydantic-core annotated-types typing-inspection typing_extensions click tqdm \
           safetensors packaging; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "$pkg"
done
ls .whl
