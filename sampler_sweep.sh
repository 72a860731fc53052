#!/bin/sh
# Feature-FID against sampling cost, from one checkpoint: DDIM with S = 10, 20, 50, 100 steps
# (eta 0, uniform spacing) and the paper's 1000-step DDPM sampler, N samples each (same seed).
#   sh sampler_sweep.sh [CHECKPOINT] [N] [extra evaluate.py flags, e.g. --device cuda]
# Writes sweep/<setting>.json and prints the table. DDIM with S = 1000 costs as much as DDPM-1000
# and is run only if SWEEP_DDIM1000=1.
set -e
CKPT=${1:-ddpm_trained.pt}
N=${2:-1000}
[ $# -ge 2 ] && shift 2 || shift $#
mkdir -p sweep
STEPS="10 20 50 100"
[ "${SWEEP_DDIM1000:-0}" = 1 ] && STEPS="$STEPS 1000"
for S in $STEPS; do
    python evaluate.py --checkpoint "$CKPT" --metrics --n_samples "$N" --bpd_images 0 --no_progress \
        --sampler ddim --sampling_steps "$S" --out "sweep/ddim$S.png" --nrow 25 --metrics_out "sweep/ddim$S.json" "$@"
done
python evaluate.py --checkpoint "$CKPT" --metrics --n_samples "$N" --bpd_images 0 --no_progress \
    --out sweep/ddpm1000.png --nrow 25 --metrics_out sweep/ddpm1000.json "$@"
python - <<'PY'
import glob, json
rows = [json.load(open(f)) for f in glob.glob("sweep/*.json")]
rows.sort(key=lambda r: (r["sampler"]["sampler"] == "ddpm", r["sampler"].get("sampling_steps", 1000)))
ref = [r for r in rows if r["sampler"]["sampler"] == "ddpm"][0]
print(f"N = {ref['n_samples']}, feature-FID floor {ref['fid_floor']:.2f}, device {ref['device']}")
print(f"{'sampler':<14}{'steps':>6}{'FID':>9}{'prec':>7}{'recall':>8}{'conf':>7}{'s / 100 samples':>17}{'speed-up':>10}")
per100 = lambda r: 100 * r["sampling_seconds"] / r["n_samples"]
for r in rows:
    s = r["sampler"]
    print(f"{s['sampler']:<14}{s.get('sampling_steps', 1000):>6}{r['fid']:>9.2f}{r['precision']:>7.3f}"
          f"{r['recall']:>8.3f}{r['confidence']:>7.3f}{per100(r):>17.1f}{per100(ref) / per100(r):>9.1f}x")
ok = [r for r in rows if r["fid"] <= 1.1 * ref["fid"]]
best = min(ok, key=per100)
print(f"cheapest within 10% of DDPM-1000's FID: {best['sampler']['sampler']} "
      f"{best['sampler'].get('sampling_steps', 1000)} steps, {per100(ref) / per100(best):.1f}x faster")
PY
