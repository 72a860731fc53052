#!/bin/sh
# Classifier-free guidance against quality: the class-conditional checkpoint at guidance scales
# w = 0, 0.5, 1, 2, 4 (digits 0-9 in turn), beside an unconditional checkpoint, N samples each
# (same seed, same sampler).
#   sh guidance_sweep.sh COND_CKPT UNCOND_CKPT [N] [extra evaluate.py flags, e.g. --sampler ddim]
# Writes guidance/<setting>.json and prints the table. GUIDANCE_SCALES overrides the list of w.
# N = 1000 with the default 1000-step sampler: about 7.5 hours on 2 CPU cores (estimate: about 95 min per
# guided w, 31 unguided, on an AMD EPYC with AVX-512); with --sampler ddim --sampling_steps 50, 1,471 s there.
set -e
[ $# -ge 2 ] || { echo "usage: sh guidance_sweep.sh COND_CKPT UNCOND_CKPT [N] [evaluate.py flags]" >&2; exit 2; }
COND=$1
UNCOND=$2
N=${3:-1000}
[ $# -ge 3 ] && shift 3 || shift 2
mkdir -p guidance
for W in ${GUIDANCE_SCALES:-0 0.5 1 2 4}; do
    python evaluate.py --checkpoint "$COND" --metrics --n_samples "$N" --bpd_images 0 --no_progress \
        --digits all --guidance_scale "$W" --out "guidance/cond_w$W.png" --nrow 20 \
        --metrics_out "guidance/cond_w$W.json" "$@"
done
python evaluate.py --checkpoint "$UNCOND" --metrics --n_samples "$N" --bpd_images 0 --no_progress \
    --out guidance/uncond.png --nrow 20 --metrics_out guidance/uncond.json "$@"
python - <<'PY'
import glob, json
rows = [json.load(open(f)) for f in sorted(glob.glob("guidance/*.json"))]
rows.sort(key=lambda r: (r.get("conditional_accuracy") is None, r.get("guidance_scale", 0)))
r0 = rows[0]
print(f"N = {r0['n_samples']}, feature-FID floor {r0['fid_floor']:.2f}, sampler {r0['sampler']}, device {r0['device']}")
print(f"{'model':<14}{'w':>5}{'FID':>9}{'prec':>7}{'recall':>8}{'conf':>7}{'cond. acc':>11}{'s / 100':>9}")
for r in rows:
    cond = r.get("conditional_accuracy")
    name = "conditional" if cond is not None else "unconditional"
    w = f"{r['guidance_scale']:g}" if cond is not None else "-"
    acc = f"{cond:.3f}" if cond is not None else "-"
    print(f"{name:<14}{w:>5}{r['fid']:>9.2f}{r['precision']:>7.3f}{r['recall']:>8.3f}{r['confidence']:>7.3f}"
          f"{acc:>11}{100 * r['sampling_seconds'] / r['n_samples']:>9.1f}")
PY
