#!/usr/bin/env bash
# One prepared GPU run (<= 10 minutes): train the embedded Fashion-MNIST model, then the miniature
# reproduction on its snapshots, then the model-level device check. Run from the repo root on a GPU machine with PyTorch:
#   bash benchmarks/device_train_fmnist.sh --data DIR_WITH_IDX_GZ --out OUTDIR [--train-seconds 200]
# Writes to OUTDIR: fmnist32.safetensors + .json (the EMA weights and card), snapshots_{a,b}.tar
# (EMA snapshots, float16), results.tar (throughput, training state, reproduction.json), log.txt.
set -uo pipefail
DATA=.devdata/fmnist OUT=out TRAIN_SECONDS=150 BATCH=512 DEVICE=cuda REPRO_EXTRA="" ARMS=none:eager,bfloat16:eager,bfloat16:compile
while [ $# -gt 0 ]; do
  case "$1" in
    --data) DATA=$2; shift 2;; --out) OUT=$2; shift 2;;
    --train-seconds) TRAIN_SECONDS=$2; shift 2;;
    --device) DEVICE=$2; shift 2;; --batch-size) BATCH=$2; shift 2;;
    --repro-extra) REPRO_EXTRA=$2; shift 2;; --arms) ARMS=$2; shift 2;;  # e.g. "--limit-train 600 --limit-test 200" for a CPU dry run
    *) echo "unknown option $1" >&2; exit 2;;
  esac
done
mkdir -p "$OUT"; WORK=$(mktemp -d); RUN=$WORK/run
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"

# 1. Throughput of the training step (eager vs compile, fp32 vs bf16), and the choice it implies.
timeout 100 python3 benchmarks/bench_train.py --device $DEVICE --steps 60 --warmup 10 --batch-size $BATCH \
  --arms $ARMS --json "$WORK/bench_train_gpu.json"
read -r STEPS COMPILE < <(python3 - "$WORK/bench_train_gpu.json" "$TRAIN_SECONDS" "$BATCH" <<'PY'
import json, sys
secs = float(sys.argv[2]); batch = int(sys.argv[3])
try:
    res = json.load(open(sys.argv[1]))
except OSError:  # no measurement: a conservative eager run
    print(int(2000 * secs / batch), "--no-compile"); raise SystemExit
ok = {("compile" if a["compile"] else "eager"): a for a in res["arms"] if a.get("autocast") == "bfloat16" and "images_per_s" in a} or {"eager": {"images_per_s": 2000.0, "warmup_s": 0.0}}
# compile pays if its steady rate over the run outweighs its warm-up (compile) time
best = max(ok, key=lambda k: ok[k]["images_per_s"] * max(0.0, secs - ok[k]["warmup_s"]))
ips = ok[best]["images_per_s"] * 0.9
steps = int(ips * max(30.0, secs - ok[best]["warmup_s"]) / batch)
print(steps, "--compile" if best == "compile" else "--no-compile")
PY
)
echo "training: $STEPS steps of $BATCH ($COMPILE)"

# 2. Train (bf16 autocast, Min-SNR-5, AdamW 1e-3, EMA 0.9995), EMA snapshots along the way.
ARGS=(--out "$RUN" --data "$DATA" --steps "$STEPS" --batch-size $BATCH --lr 1e-3 --warmup-steps 300
      --ema-decay 0.9995 --weighting min-snr --snr-gamma 5 --device $DEVICE --channels-last $COMPILE
      --autocast bfloat16 --checkpoint-every 1000 --snapshot-epochs 0.5,1,2,5,10,20,40,80)
timeout $((TRAIN_SECONDS + 120)) python3 -m diffbank train "${ARGS[@]}" --max-seconds $((TRAIN_SECONDS + 30))
python3 -m diffbank train "${ARGS[@]}" --until-step 0 --export "$OUT/fmnist32.safetensors" || true

# 3. Pack the weights that come back (at most 8 files of 16 MiB): snapshots as float16.
python3 - "$RUN" "$WORK" <<'PY'
import sys, pathlib, torch
from safetensors.torch import load_file, save_file
run, work = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
for f in sorted((run / "snapshots").glob("*.safetensors")):
    save_file({k: v.half() for k, v in load_file(f).items()}, str(work / ("f16_" + f.name)))
PY
SNAPS=$(cd "$WORK" && ls f16_*.safetensors 2>/dev/null)
set -- $SNAPS
(cd "$WORK" && tar cf "$OUT/snapshots_a.tar" ${@:1:4}) 2>/dev/null || true
[ $# -gt 4 ] && (cd "$WORK" && tar cf "$OUT/snapshots_b.tar" ${@:5:4}) || true
cp "$RUN/state.json" "$WORK/train_state.json" 2>/dev/null

# 4. The reproduction on every snapshot (features for all 70,000 images, exact logistic probes).
timeout 220 python3 benchmarks/fmnist_reproduction.py --run "$RUN" --out "$WORK/repro" --data "$DATA" \
  --device $DEVICE --workers 14 $REPRO_EXTRA

(cd "$WORK" && tar cf "$OUT/results.tar" bench_train_gpu.json train_state.json repro) || true

# 5. The model-level device check (correctness against guided-diffusion's outputs, throughput at 256x256).
timeout 110 python3 benchmarks/device_check.py --device $DEVICE --out "$OUT" --budget 90 --sections correctness,batch_independence,throughput $([ "$DEVICE" = cpu ] && echo --quick)

ls -la "$OUT"
