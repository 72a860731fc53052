#!/bin/sh
# Feature-FID against network evaluations (NFE) for every sampler, from one checkpoint, N samples each
# (seed 0), written to docs/sampling.md's table (measured on the linear-schedule checkpoint published
# until 8179394: git show 8179394:checkpoints/ddpm_trained.pt > ddpm_linear.pt):
#   sh sampler_sweep.sh [CHECKPOINT] [N] [extra evaluate.py flags, e.g. --device cuda]
# Rows: each few-step sampler at its own spacing at NFE 10, 20, 50, 100; the other spacings at NFE 20;
# and the paper's 1000-step sampler, which takes 31-72 minutes for N = 1000 on 2 cores of an AMD EPYC (estimates
# on two such machines, docs/guidance.md and docs/sampling.md):
# SWEEP_DDPM=0 skips it, SWEEP_DDPM_NPZ=FILE.npz scores 1000-step samples drawn elsewhere (say, on a
# GPU by gpu_paper.sh) instead. Each row goes to sweep/<row>.json as soon as it is done, with the
# checkpoint's SHA-256, the commit, the torch version and the CPU; a row whose file exists is skipped,
# so an interrupted sweep resumes where it stopped. Speeds compare only rows timed on one machine.
# SWEEP_NFE="10 20 50" limits the NFE rows (the NFE-100 rows alone take about 30 minutes on 2 cores of an AMD EPYC;
# with SWEEP_DDPM=0 and N = 1000 the rows' sampling times there add up to about 75 minutes, docs/sampling.md).
set -e
CKPT=${1:-checkpoints/ddpm_trained.pt}
N=${2:-1000}
[ $# -ge 2 ] && shift 2 || shift $#
OUT=${SWEEP_DIR:-sweep}
mkdir -p "$OUT"
stamp() {  # $1: a row's JSON; adds what the row was measured with
    python - "$1" "$CKPT" <<'PY'
import hashlib, json, subprocess, sys
import torch
path, ckpt = sys.argv[1:]
r = json.load(open(path))
cpu = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")][:1]
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
r.update(checkpoint_sha256=hashlib.sha256(open(ckpt, "rb").read()).hexdigest(), commit=commit or None,
         cpu=cpu[0] if cpu else None, torch=torch.__version__)
json.dump(r, open(path, "w"), indent=1)
PY
}
row() {  # $1: row name; the rest: evaluate.py sampler flags
    name=$1; shift
    [ -f "$OUT/$name.json" ] && { echo "$name: done before, skipped"; return; }
    python evaluate.py --checkpoint "$CKPT" --metrics --n_samples "$N" --bpd_images 0 --no_progress \
        --out "$OUT/$name.png" --nrow 25 --metrics_out "$OUT/$name.json.tmp" "$@" $EXTRA
    mv "$OUT/$name.json.tmp" "$OUT/$name.json"
    stamp "$OUT/$name.json"
}
EXTRA="$*"
for S in ${SWEEP_NFE-10 20 50 100}; do
    for sampler in ddim dpm++2m dpm++2m-sde restart; do
        row "$sampler-$S" --sampler "$sampler" --sampling_steps "$S"
    done
done
for spacing in uniform quadratic logsnr karras; do
    for sampler in ddim dpm++2m dpm++2m-sde restart; do
        [ -f "$OUT/$sampler-20.json" ] && grep -q "\"spacing\": \"$spacing\"" "$OUT/$sampler-20.json" && continue
        row "$sampler-20-$spacing" --sampler "$sampler" --sampling_steps 20 --spacing "$spacing"
    done
done
if [ -n "${SWEEP_DDPM_NPZ:-}" ]; then
    [ -f "$OUT/ddpm-1000.json" ] || { python evaluate.py --metrics --from_samples "$SWEEP_DDPM_NPZ" --no_progress \
        --metrics_out "$OUT/ddpm-1000.json.tmp" && mv "$OUT/ddpm-1000.json.tmp" "$OUT/ddpm-1000.json" &&
        stamp "$OUT/ddpm-1000.json"; }
elif [ "${SWEEP_DDPM:-1}" != 0 ]; then
    row ddpm-1000 --sampler ddpm
fi
python - "$OUT" <<'PY'
import glob, json, sys
rows = [json.load(open(f)) for f in sorted(glob.glob(f"{sys.argv[1]}/*.json"))]
rows.sort(key=lambda r: (r["sampler"]["sampler"] == "ddpm", r["sampler"]["sampler"], r.get("nfe", 1000),
                         r["sampler"].get("spacing", "")))
ref = [r for r in rows if r["sampler"]["sampler"] == "ddpm"]
print(f"n = {rows[0]['n_samples']}, feature-FID floor {rows[0]['fid_floor']:.2f}")
print(f"{'sampler':<13}{'spacing':<10}{'NFE':>5}{'FID':>8}{'prec':>7}{'recall':>8}{'conf':>7}{'s/100':>7}  device")
for r in rows:
    s, sec = r["sampler"], r.get("sampling_seconds")
    per100 = f"{100 * sec / r['n_samples']:.1f}" if sec is not None else "-"
    print(f"{s['sampler']:<13}{s.get('spacing', '-'):<10}{r.get('nfe', 1000):>5}{r['fid']:>8.2f}{r['precision']:>7.3f}"
          f"{r['recall']:>8.3f}{r['confidence']:>7.3f}{per100:>7}  {r.get('device', '?')}")
if ref:
    ok = [r for r in rows if r is not ref[0] and r["fid"] <= 1.1 * ref[0]["fid"]]
    best = min(ok, key=lambda r: r.get("nfe", 1000)) if ok else None
    print("fewest NFE within 10% of the 1000-step sampler's FID: " +
          (f"{best['sampler']['sampler']} ({best['sampler']['spacing']}), NFE {best['nfe']}" if best else "none"))
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from config import DEFAULT_SPACING
fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
for name, spacing in DEFAULT_SPACING.items():
    pts = sorted((r["nfe"], r["fid"]) for r in rows if r["sampler"]["sampler"] == name
                 and r["sampler"].get("spacing") == spacing)
    if pts:
        ax.plot(*zip(*pts), "o-", label=f"{name} ({spacing})")
if ref:
    ax.plot([1000], [ref[0]["fid"]], "k*", markersize=10, label="ddpm, Algorithm 2 (1000 steps)")
    ax.axhline(1.1 * ref[0]["fid"], color="k", lw=0.8, ls=":", label="10% above the 1000-step sampler")
ax.axhline(rows[0]["fid_floor"], color="gray", lw=0.8, ls="--", label=f"real-data floor (n = {rows[0]['n_samples']})")
ax.set(xscale="log", xlabel="network evaluations per sample (NFE)", ylabel="feature-FID (lower is better)")
ax.legend(fontsize=7)
ax.grid(alpha=0.3, which="both")
fig.tight_layout()
fig.savefig(f"{sys.argv[1]}/fid_vs_nfe.png")
print(f"wrote {sys.argv[1]}/fid_vs_nfe.png")
PY
