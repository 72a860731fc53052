"""The README's Results rows: each checkpoint sampled with 3 seeds at n = 1000, scored by the published judge.

    python experiments/headline.py              # the README's rows: samples what is missing (2-5 min per row
                                          # and seed on 2 CPU cores), scores everything, prints the table
    python experiments/headline.py --rows uncond_cosine --seeds 0,1,2,3,4

The samples are committed (docs/results/ROW_seedS.npz, uint8, compressed), so a later change of the
judge is a re-score (`evaluate.py --metrics --from_samples`), not a re-sample. A seed whose .npz
exists is not sampled again; its scores go to docs/results/ROW_seedS.json (by the sweep runner,
common.run_rows: a score is made again only when it is missing, older than its samples, not by the published
judge, or --rescore asks for it). A row whose checkpoint is
no longer in the tree (a previous published one, the retrain's or the class-conditional run's training
checkpoint) restores it from git history when the file is missing (RESTORED: `git show COMMIT:PATH > FILE`).

The rows r30_emaD are the 30-epoch retrain's EMAs (`evaluate.py --ema D`), for the rule that picked the
published one (docs/experiments.md): `--rows r30_ema0.998,r30_ema0.999,r30_ema0.9995,r30_ema0.9999`
prints the rule's verdict (rules.ema_verdict) for each stored EMA against the main 0.9995 (paired by sampling seed). The
published checkpoints/ddpm_trained.pt is that main EMA exported (the same weights, so the same digits):
its README row is r30_ema0.9995.
"""
import os
import subprocess

import common  # first: the repo's modules onto sys.path

# isort: split
import config
import rules
import samplers
from common import ROOT
from metrics import JUDGE_SHA256
from utils import atomic_write

OUT = os.path.join(ROOT, "docs", "results")
SAMPLER = [*samplers.as_flags(samplers.RECOMMENDED), "--n_samples", "1000", "--batch_size", str(common.SAMPLE_BATCH)]
RETRAIN = "ca76ca5"  # the commit whose checkpoints/in_progress/reference30.pt is the retrain's last state
COND30 = "9419ba0"  # the commit whose checkpoints/in_progress/cond30.pt is the class-conditional run's last state
RESTORED = {  # a row's checkpoint file -> (commit, path) it is restored from when missing
    "ddpm_linear.pt": ("8179394", "checkpoints/ddpm_trained.pt"),  # published before the cosine schedule
    "ddpm_cosine20.pt": ("cc4c0f7", "checkpoints/ddpm_trained.pt"),  # published before the 30-epoch retrain
    "reference30_final.pt": (RETRAIN, "checkpoints/in_progress/reference30.pt"),
    "cond30_final.pt": (COND30, "checkpoints/in_progress/cond30.pt"),
}
EMAS = ("0.998", "0.999", "0.9995", "0.9999")  # the retrain's stored EMAs; 0.9995 is its main one
MAIN_EMA = "0.9995"
# The published checkpoints/ddpm_trained.pt is the retrain's main EMA exported: the same weights, so the same digits
PUBLISHED = f"`ddpm_trained.pt` (unconditional, cosine schedule, 30 epochs; the retrain's EMA {MAIN_EMA})"
COND = "`ddpm_cond.pt` (class-conditional, linear schedule, 20 epochs)"
RANDOM = ["--digits", "random", "--guidance_scale", "0"]
ROWS = {  # name: (checkpoint, extra evaluate.py flags, what the row is)
    **{f"r30_ema{d}": ("reference30_final.pt", ["--ema", d], PUBLISHED if d == MAIN_EMA else
                       f"the 30-epoch retrain, EMA {d}") for d in EMAS},
    "uncond_cosine": ("ddpm_cosine20.pt", [], "the previous `ddpm_trained.pt` (cosine schedule, 20 epochs)"),
    "uncond_linear": ("ddpm_linear.pt", [], "the one before (linear schedule, 20 epochs)"),
    "cond_w0": ("checkpoints/ddpm_cond.pt", ["--guidance_scale", "0"], f"{COND}, w = 0, digits 0-9 in turn"),
    # unconditional digits from class-conditional models: each label drawn uniformly at random (seeded by --seed)
    "cond30_random": ("cond30_final.pt", RANDOM, "class-conditional, row 1's recipe and steps, w = 0, random digits"),
    "cond_random": ("checkpoints/ddpm_cond.pt", RANDOM, f"{COND}, w = 0, random digits"),
}
README_ROWS = (f"r30_ema{MAIN_EMA}", "cond30_random", "cond_random", "uncond_cosine", "uncond_linear")  # in order
METRICS = (("fid", "feature-FID", 2), ("precision", "precision", 3), ("recall", "recall", 3),
           ("confidence", "confident", 3), ("conditional_accuracy", "conditional accuracy", 3))


def ensure_checkpoint(name):
    """The path of a row's checkpoint relative to the repo root (evaluate.py runs there and records it),
    restored from git history (RESTORED) when it is missing."""
    path = os.path.join(ROOT, name)
    if os.path.exists(path) or name not in RESTORED:
        return name
    commit, source = RESTORED[name]
    try:
        data = subprocess.run(["git", "show", f"{commit}:{source}"], cwd=ROOT, capture_output=True).stdout
    except OSError:
        data = b""
    if not data:
        raise common.UserError(f"cannot restore {path} with 'git show {commit}:{source}' (not a full clone?)")
    atomic_write(path, lambda f: f.write(data))
    return name


def run_row(name, seeds, rescore, data_dir):
    """Sample (if missing) and score each seed of a row; returns the list of score dicts."""
    ckpt, extra, _ = ROWS[name]
    at = {seed: os.path.join(OUT, f"{name}_seed{seed}") for seed in seeds}  # + .npz, .json

    def fresh(js):  # a score is re-made when missing, older than its samples, or not by the published judge
        npz = js[:-5] + ".npz"
        return not rescore and os.path.exists(npz) and os.path.exists(js) and \
            os.path.getmtime(js) >= os.path.getmtime(npz) and common.read_json(js).get("judge_sha256") == JUDGE_SHA256

    def measure(seed, tmp):
        # evaluate.py runs in the repo root and gets paths relative to it: the scores record them, not this machine's
        npz, png = (os.path.relpath(p, ROOT) for p in (at[seed] + ".npz", os.path.join(OUT, f".{name}_seed{seed}.png")))
        if not os.path.exists(at[seed] + ".npz"):
            common.evaluate("--checkpoint", ensure_checkpoint(ckpt), *SAMPLER, *extra, "--seed", seed, "--no_progress",
                            "--out", png, "--save_samples", npz, cwd=ROOT)
            os.remove(os.path.join(ROOT, png))  # the grid is a hidden scrap: the samples are the npz
        common.evaluate("--metrics", "--from_samples", npz, "--seed", seed, "--no_progress", "--metrics_out", tmp,
                        "--data_dir", data_dir, cwd=ROOT)
    common.run_rows([(at[seed] + ".json", None, seed) for seed in seeds], measure, done=fresh)
    return [common.read_json(at[seed] + ".json") for seed in seeds]


def summary(scores):
    """{metric: (mean, std over seeds)} for the metrics every seed has."""
    return {key: common.mean_std([s[key] for s in scores]) for key, _, _ in METRICS if all(key in s for s in scores)}


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--rows", default=",".join(README_ROWS),
                   help=f"comma-separated, of {', '.join(ROWS)} (default: the README's Results)")
    p.add_argument("--seeds", type=config.int_list, default="0,1,2", help="comma-separated sampling seeds")
    p.add_argument("--rescore", action="store_true", help="score every seed again (a new judge)")
    p.add_argument("--data_dir", default="./data", help="MNIST, for the floors (relative to the repo root)")
    args = p.parse_args(argv)
    rows = args.rows.split(",")
    if any(r not in ROWS for r in rows):
        raise common.UserError(f"--rows must name rows of {', '.join(ROWS)}, got {args.rows!r}")
    os.makedirs(OUT, exist_ok=True)
    results = {name: run_row(name, args.seeds, args.rescore, args.data_dir) for name in rows}
    first = results[rows[0]][0]
    seeds = ",".join(map(str, args.seeds))
    print(f"\nmean +- std over sampling seeds {seeds}, n = {first['n_samples']}, {first['judge']}")
    print("| checkpoint | " + " | ".join(label for _, label, _ in METRICS) + " |")
    print("| --- |" + " --- |" * len(METRICS))
    for name, scores in results.items():
        s = summary(scores)
        cells = [f"{s[k][0]:.{d}f} +- {s[k][1]:.{d}f}" if k in s else "" for k, _, d in METRICS]
        print(f"| {ROWS[name][2]} | " + " | ".join(cells) + " |")
    main_ema = results.get(f"r30_ema{MAIN_EMA}")
    for d in EMAS:  # the rule that picks the retrain's published EMA (docs/experiments.md)
        if main_ema and d != MAIN_EMA and f"r30_ema{d}" in results:
            print(rules.ema_verdict(d, list(zip(main_ema, results[f"r30_ema{d}"])), unit="seeds"))
    machines = sorted({f"{sc.get('cpu')}, torch {sc.get('torch')}" for sc in sum(results.values(), [])})
    print("sampled on: " + "; ".join(machines))


if __name__ == "__main__":
    common.run_main(main)
