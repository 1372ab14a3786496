#!/usr/bin/env bash
# The prepared device check, one call on a bare GPU machine (<= 8 minutes), from the repo root:
#   bash benchmarks/device_check.sh --out "$OUT"          (wheels from benchmarks/fetch_device_wheels.sh in .whl/)
# Installs zarr/dask/numcodecs from .whl/ when they are missing, then runs device_check.py (correctness, batch
# independence, the block-24 arms: eager, torch.compile, CUDA graphs, channels_last; the store-level pipeline;
# the eager throughput table) and writes OUT/device_check.json after every section and arm. Extra arguments go
# to device_check.py (e.g. --budget 300, --sections arms, --device cpu --quick).
set -uo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import zarr, dask, numcodecs" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
# device_check.py's --budget (420 s unless given) bounds its own work; the timeout bounds the rest (start-up, the
# kernel or compile step running when the budget ends) so that the whole script ends within 480 s.
exec timeout $((470 - SECONDS)) python3 benchmarks/device_check.py "$@"
