"""Feature-FID against network evaluations (NFE) for every sampler, from one checkpoint, N samples each
(seed 0), written to docs/sampling.md's table (measured on the linear-schedule checkpoint published
until 8179394: git show 8179394:checkpoints/ddpm_trained.pt > ddpm_linear.pt):

    python experiments/sampler_sweep.py [CHECKPOINT] [N] [sweep flags] [extra evaluate.py flags, e.g. --device cuda]

Rows, from the samplers registry (samplers.SAMPLERS: a new sampler joins with no edit here): each few-step
sampler at its own spacing at --nfe's solver steps (default 10, 20, 50, 100); the other spacings at 20;
and the paper's 1000-step sampler, which takes 31-72 minutes for N = 1000 on 2 cores of an AMD EPYC
(estimates on two such machines, docs/guidance.md and docs/sampling.md): --no_ddpm skips it,
--ddpm_npz FILE.npz scores 1000-step samples drawn elsewhere (say, on a GPU by experiments/gpu_paper.py)
instead. Each row goes to DIR/<row>.json as soon as it is done, with the checkpoint's SHA-256, the
commit, the torch version and the CPU; a row whose file exists is skipped, so an interrupted sweep
resumes where it stopped. Speeds compare only rows timed on one machine. --nfe 10,20,50 limits the NFE
rows (the NFE-100 rows alone take about 30 minutes on 2 cores of an AMD EPYC; with --no_ddpm and
N = 1000 the rows' sampling times there add up to about 75 minutes, docs/sampling.md).
Then the table of every row in DIR, and DIR/fid_vs_nfe.png.
"""
import os

import common  # first: the repo's modules onto sys.path

# isort: split
import samplers


def rows(nfe, ddpm):
    """[(row name, evaluate.py sampler flags)] in the sweep's order, from the registry."""
    few = [s for s in samplers.SAMPLERS.values() if s.spacing is not None]
    out = [(f"{s.name}-{n}", ["--sampler", s.name, "--sampling_steps", str(n)]) for n in nfe for s in few]
    out += [(f"{s.name}-20-{sp}", ["--sampler", s.name, "--sampling_steps", "20", "--spacing", sp])
            for sp in samplers.SPACINGS for s in few if not (sp == s.spacing and 20 in nfe)]
    return out + ([("ddpm-1000", ["--sampler", "ddpm"])] if ddpm else [])


def run_row(args, extra, name, flags):
    """One row into DIR/name.json (skipped when that file exists), stamped with what it was measured with."""
    if name == "ddpm-1000" and args.ddpm_npz:
        flags = ["--from_samples", args.ddpm_npz]
    else:
        flags = ["--checkpoint", args.checkpoint, "--n_samples", args.n, "--bpd_images", 0,
                 "--out", os.path.join(args.dir, f"{name}.png"), "--nrow", 25, *flags, *extra]
    common.make_row(os.path.join(args.dir, f"{name}.json"), lambda tmp: common.evaluate(
        "--metrics", "--no_progress", "--metrics_out", tmp, *flags), args.checkpoint)


def table(rows):
    """Print the rows (sorted by sampler, NFE, spacing; the 1000-step sampler last) and which is the cheapest
    within 10% of the 1000-step sampler's FID. Returns the 1000-step row or None."""
    rows.sort(key=lambda r: (r["sampler"]["sampler"] == "ddpm", r["sampler"]["sampler"], r.get("nfe", 1000),
                             r["sampler"].get("spacing", "")))
    ref = next((r for r in rows if r["sampler"]["sampler"] == "ddpm"), None)
    print(f"n = {rows[0]['n_samples']}, feature-FID floor {rows[0]['fid_floor']:.2f}")
    print(f"{'sampler':<13}{'spacing':<10}{'NFE':>5}{'FID':>8}{common.QUALITY}{'s/100':>7}  device")
    for r in rows:
        s, sec = r["sampler"], r.get("sampling_seconds")
        per100 = f"{100 * sec / r['n_samples']:.1f}" if sec is not None else "-"
        print(f"{s['sampler']:<13}{s.get('spacing', '-'):<10}{r.get('nfe', 1000):>5}{common.quality(r)}{per100:>7}"
              f"  {r.get('device', '?')}")
    if ref:
        ok = [r for r in rows if r is not ref and r["fid"] <= 1.1 * ref["fid"]]
        best = min(ok, key=lambda r: r.get("nfe", 1000)) if ok else None
        print("fewest NFE within 10% of the 1000-step sampler's FID: " +
              (f"{best['sampler']['sampler']} ({best['sampler']['spacing']}), NFE {best['nfe']}" if best else "none"))
    return ref


def plot(rows, ref, path):
    """FID against NFE, one line per sampler at its own spacing; the 1000-step sampler and the floor as marks."""
    with common.figure(path, (6, 4), legend=7, xscale="log", xlabel="network evaluations per sample (NFE)",
                       ylabel="feature-FID (lower is better)") as ax:
        for s in samplers.SAMPLERS.values():
            pts = sorted((r["nfe"], r["fid"]) for r in rows if r["sampler"]["sampler"] == s.name
                         and s.spacing is not None and r["sampler"].get("spacing") == s.spacing)
            if pts:
                ax.plot(*zip(*pts), "o-", label=f"{s.name} ({s.spacing})")
        if ref:
            ax.plot([1000], [ref["fid"]], "k*", markersize=10, label="ddpm, Algorithm 2 (1000 steps)")
            ax.axhline(1.1 * ref["fid"], color="k", lw=0.8, ls=":", label="10% above the 1000-step sampler")
        ax.axhline(rows[0]["fid_floor"], color="gray", lw=0.8, ls="--",
                   label=f"real-data floor (n = {rows[0]['n_samples']})")


def main(argv=None):
    p = common.parser(__doc__, passes_on=True)
    p.add_argument("checkpoint", nargs="?", default="checkpoints/ddpm_trained.pt")
    p.add_argument("n", nargs="?", type=int, default=1000, help="samples per row (default 1000)")
    p.add_argument("--nfe", default="10,20,50,100", help="solver steps of the rows at each sampler's own spacing")
    p.add_argument("--no_ddpm", action="store_true", help="no 1000-step row")
    p.add_argument("--ddpm_npz", metavar="FILE.npz", help="score the 1000-step row from samples drawn elsewhere")
    p.add_argument("--dir", default="sweep", help="where the rows go (default sweep)")
    args, extra = p.parse_known_args(argv)
    nfe = common.split_list(args.nfe, "--nfe")
    os.makedirs(args.dir, exist_ok=True)
    for name, flags in rows(nfe, ddpm=bool(args.ddpm_npz) or not args.no_ddpm):
        run_row(args, extra, name, flags)
    done = common.read_rows(args.dir)
    plot(done, table(done), os.path.join(args.dir, "fid_vs_nfe.png"))


if __name__ == "__main__":
    common.run_main(main)
