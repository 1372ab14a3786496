#!/usr/bin/env bash
# The prepared device check, one call on a bare GPU machine (<= 8 minutes), from the repo root:
#   bash benchmarks/device_check.sh --out "$OUT"          (wheels from benchmarks/fetch_device_wheels.sh in .whl/)
# Installs zarr/dask/numcodecs from .whl/ when they are missing, then runs device_check.py (model
# correctness, batch independence, throughput, and the store-level pipeline section) and writes
# OUT/device_check.json. Extra arguments go to device_check.py (e.g. --device cpu --quick).
set -uo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import zarr, dask, numcodecs" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec timeout 470 python3 benchmarks/device_check.py --compile --budget 200 "$@"
