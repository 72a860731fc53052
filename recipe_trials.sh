#!/bin/sh
# Training recipes at equal cost: the cpu preset's model and number of optimizer steps,
# with and without each recipe option, every trial judged on N samples with one fixed sampler.
#   sh recipe_trials.sh [N]          # N = 1000 by default
# A trial is NAME:SEED:FLAGS (FLAGS with + for spaces); RECIPE_TRIALS overrides the list below.
# Each trial trains into trials/NAME-sSEED.pt with --eval_every (the curve is stored in it), then writes
# trials/NAME-sSEED.json (the judge's numbers, the training time and the CPU). A trial whose JSON
# exists is skipped, and an interrupted training is resumed, so rerunning continues where it stopped.
# Run it alone: the times are part of the table (about 30 minutes a trial on 2 cores of an AMD EPYC,
# 2 hours for the default four; docs/experiments.md).
# Then the table of every trial in the folder, with its --eval_every curve, and OUT/recipe_curves.png.
# TRIALS_SAMPLER: the judge's sampler flags; TRIALS_DATA: the MNIST folder; TRIALS_DIR: the output folder.
set -e
N=${1:-1000}
OUT=${TRIALS_DIR:-trials}
SAMPLER=${TRIALS_SAMPLER:---sampler dpm++2m-sde --sampling_steps 50}
DATA=${TRIALS_DATA:-./data}
mkdir -p "$OUT"
# The baseline is the cpu preset as it was before it adopted the cosine schedule: the paper's linear one.
LIN=--schedule+linear
for trial in ${RECIPE_TRIALS:-base:0:$LIN base:1:$LIN min_snr:0:$LIN+--loss_weight+min_snr cosine:0:--schedule+cosine}; do
    name=${trial%%:*}; rest=${trial#*:}; seed=${rest%%:*}; flags=$(echo "${rest#*:}" | tr '+' ' ')
    run="$OUT/$name-s$seed"
    [ -f "$run.json" ] && { echo "$name-s$seed: done before, skipped"; continue; }
    resume=""
    [ -f "$run.pt" ] && resume="--resume"
    mkdir -p "$run"
    start=$(date +%s)
    python run.py --preset cpu --seed "$seed" $flags --eval_every 937 --checkpoint "$run.pt" --out_dir "$run" \
        --n_samples 10 $SAMPLER --no_progress --data_dir "$DATA" $resume >> "$run.log" 2>&1 || { tail -3 "$run.log"; exit 1; }
    grep -E "^(eval at|average speed|evaluations|trained to)" "$run.log" || true
    train_s=$(( $(date +%s) - start ))  # this session's part of the training, evaluations included
    python evaluate.py --checkpoint "$run.pt" --metrics --n_samples "$N" --batch_size 250 --bpd_images 0 \
        --data_dir "$DATA" --no_progress --out "$run/samples.png" --nrow 25 --metrics_out "$run.json.tmp" $SAMPLER
    python - "$run.json.tmp" "$trial" "$train_s" "$run.log" <<'PY'
import json, re, subprocess, sys
import torch
path, trial, wall, log = sys.argv[1:]
r = json.load(open(path))
speed = re.findall(r"average speed: ([0-9.]+) steps/s", open(log).read())
cpu = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")][:1]
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
r.update(trial=trial, train_wall_seconds=int(wall), steps_per_second=float(speed[-1]) if speed else None,
         cpu=cpu[0] if cpu else None, commit=commit or None, torch=torch.__version__)
json.dump(r, open(path, "w"), indent=1)
PY
    mv "$run.json.tmp" "$run.json"
done
python - "$OUT" <<'PY'
import glob, json, os, re, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
out = sys.argv[1]
rows = [json.load(open(f)) for f in sorted(glob.glob(f"{out}/*.json"))]
print(f"n = {rows[0]['n_samples']}, sampler {rows[0]['sampler']}, feature-FID floor {rows[0]['fid_floor']:.2f}")
print(f"{'trial':<34}{'FID':>8}{'prec':>7}{'recall':>8}{'conf':>7}{'train s':>9}  CPU")
fig, ax = plt.subplots(figsize=(7, 4))
for r in rows:
    print(f"{r['trial']:<34}{r['fid']:>8.2f}{r['precision']:>7.3f}{r['recall']:>8.3f}{r['confidence']:>7.3f}"
          f"{r['train_wall_seconds']:>9}  {r['cpu']}")
    name, seed = r["trial"].split(":")[:2]
    log = os.path.join(out, f"{name}-s{seed}.log")  # the --eval_every curve, as the training printed it
    found = re.findall(r"^eval at step (\d+): feature-FID ([0-9.]+), confident [0-9.]+ \(n = (\d+)", open(log).read(), re.M)
    curve = {s: fid for s, fid, _ in found}  # a step evaluated twice (resumed before its save): the last
    steps = sorted(curve, key=int)
    print(f"{'':<4}--eval_every curve (feature-FID, n = {found[-1][2] if found else '?'}): "
          + ", ".join(f"{curve[s]} at {s}" for s in steps))
    ax.plot([int(s) for s in steps], [float(curve[s]) for s in steps], "o-" if seed == "0" else "s--",
            label=f"{name} seed {seed}")
ax.set_xlabel("optimizer step")
ax.set_ylabel("feature-FID of --eval_every's digits")
ax.set_yscale("log")
ax.grid(True, which="both", alpha=0.3)
ax.legend()
ax.set_title("recipe trials: quality while training")
fig.tight_layout()
fig.savefig(f"{out}/recipe_curves.png", dpi=120)
print(f"wrote {out}/recipe_curves.png")
PY
