"""The README's Results rows: each checkpoint sampled with 3 seeds at n = 1000, scored by the published judge.

    python experiments/headline.py              # samples what is missing (about 3 min per row and seed on 2 CPU
                                          # cores), scores everything, prints the table
    python experiments/headline.py --rows uncond_cosine --seeds 0,1,2,3,4

The samples are committed (docs/results/ROW_seedS.npz, uint8, compressed), so a later change of the
judge is a re-score (`evaluate.py --metrics --from_samples`), not a re-sample. A seed whose .npz
exists is not sampled again; its scores go to docs/results/ROW_seedS.json. The linear-schedule row
needs the previous published checkpoint: `git show 8179394:checkpoints/ddpm_trained.pt > ddpm_linear.pt`
(done here when the file is missing).
"""
import os
import subprocess

import common  # first: the repo's modules onto sys.path

# isort: split
import samplers
from common import ROOT
from metrics import JUDGE_SHA256
from utils import atomic_write

OUT = os.path.join(ROOT, "docs", "results")
SAMPLER = [*samplers.RECOMMENDED, "--n_samples", "1000", "--batch_size", str(common.SAMPLE_BATCH)]
ROWS = {  # name: (checkpoint, extra evaluate.py flags, what the row is)
    "uncond_cosine": ("checkpoints/ddpm_trained.pt", [], "`ddpm_trained.pt` (unconditional, cosine schedule)"),
    "uncond_linear": ("ddpm_linear.pt", [], "the previous `ddpm_trained.pt` (linear schedule, same steps)"),
    "cond_w0": ("checkpoints/ddpm_cond.pt", ["--guidance_scale", "0"],
                "`ddpm_cond.pt` (class-conditional, linear schedule), w = 0, digits 0-9 in turn"),
}
LINEAR = ("8179394", "checkpoints/ddpm_trained.pt")  # the commit whose published checkpoint is the linear one
METRICS = (("fid", "feature-FID", 2), ("precision", "precision", 3), ("recall", "recall", 3),
           ("confidence", "confident", 3), ("conditional_accuracy", "conditional accuracy", 3))


def ensure_linear_checkpoint():
    path = os.path.join(ROOT, ROWS["uncond_linear"][0])
    if os.path.exists(path):
        return
    try:
        data = subprocess.run(["git", "show", f"{LINEAR[0]}:{LINEAR[1]}"], cwd=ROOT, capture_output=True).stdout
    except OSError:
        data = b""
    if not data:
        raise common.UserError(f"cannot restore {path} with 'git show {LINEAR[0]}:{LINEAR[1]}' (not a full clone?)")
    atomic_write(path, lambda f: f.write(data))


def run_row(name, seeds, rescore, data_dir):
    """Sample (if missing) and score each seed of a row; returns the list of score dicts."""
    ckpt, extra, _ = ROWS[name]
    scores = []
    for seed in seeds:
        npz, js = (os.path.join(OUT, f"{name}_seed{seed}.{ext}") for ext in ("npz", "json"))
        if not os.path.exists(npz):
            if name == "uncond_linear":
                ensure_linear_checkpoint()
            common.evaluate("--checkpoint", ckpt, *SAMPLER, *extra, "--seed", seed, "--no_progress",
                            "--out", os.path.join(OUT, f".{name}_seed{seed}.png"), "--save_samples", npz, cwd=ROOT)
            os.remove(os.path.join(OUT, f".{name}_seed{seed}.png"))
        # a score is re-made when missing, older than its samples, or not by the published judge
        if rescore or not os.path.exists(js) or os.path.getmtime(js) < os.path.getmtime(npz) or (
                common.read_json(js).get("judge_sha256") != JUDGE_SHA256):
            common.evaluate("--metrics", "--from_samples", npz, "--seed", seed, "--no_progress", "--metrics_out", js,
                            "--data_dir", data_dir, cwd=ROOT)
        scores.append(common.read_json(js))
    return scores


def summary(scores):
    """{metric: (mean, std over seeds)} for the metrics every seed has."""
    return {key: common.mean_std([s[key] for s in scores]) for key, _, _ in METRICS if all(key in s for s in scores)}


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated sampling seeds")
    p.add_argument("--rescore", action="store_true", help="score every seed again (a new judge)")
    p.add_argument("--data_dir", default="./data", help="MNIST, for the floors (relative to the repo root)")
    args = p.parse_args(argv)
    rows = args.rows.split(",")
    if any(r not in ROWS for r in rows):
        raise common.UserError(f"--rows must name rows of {', '.join(ROWS)}, got {args.rows!r}")
    seeds = common.split_list(args.seeds, "--seeds")
    os.makedirs(OUT, exist_ok=True)
    results = {name: run_row(name, seeds, args.rescore, args.data_dir) for name in rows}
    first = results[rows[0]][0]
    print(f"\nmean +- std over sampling seeds {args.seeds}, n = {first['n_samples']}, {first['judge']}")
    print("| checkpoint | " + " | ".join(label for _, label, _ in METRICS) + " |")
    print("| --- |" + " --- |" * len(METRICS))
    for name, scores in results.items():
        s = summary(scores)
        cells = [f"{s[k][0]:.{d}f} +- {s[k][1]:.{d}f}" if k in s else "" for k, _, d in METRICS]
        print(f"| {ROWS[name][2]} | " + " | ".join(cells) + " |")
    machines = sorted({f"{sc.get('cpu')}, torch {sc.get('torch')}" for sc in sum(results.values(), [])})
    print("sampled on: " + "; ".join(machines))


if __name__ == "__main__":
    common.run_main(main)
