#!/usr/bin/env bash
# The miniature reproduction on the shipped model, as one prepared GPU call (<= 8 minutes on one H200):
#   bash benchmarks/device_reproduction.sh --data .devdata/fmnist --out "$OUT"
# The random (guided-diffusion init) control and the final weights on the full 60,000 + 10,000 images: the
# same (t, block, pooling) grid and exact logistic probes selected on validation, the t-curve of the final
# model and the raw-pixels arm (heads and paired tests: benchmarks/reproduce_fmnist.py). Writes
# OUT/reproduction.json and OUT/log.txt. The IDX files travel with the call (the GPU machine has no Debian
# dataset package); wheels for zarr/dask come from benchmarks/fetch_device_wheels.sh (.whl/).
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=.devdata/fmnist OUT=out MODELS=random,final
while [ $# -gt 0 ]; do
  case "$1" in
    --data) DATA=$2; shift 2;; --out) OUT=$2; shift 2;;
    --models) MODELS=$2; shift 2;;
    *) echo "unknown option $1" >&2; exit 2;;
  esac
done
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
if ! python3 -c "import zarr, dask, numcodecs" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
timeout 450 python3 benchmarks/fmnist_reproduction.py --device cuda --data "$DATA" --out "$OUT" \
  --models "$MODELS" --workers "$(nproc)"
echo "exit $?"
