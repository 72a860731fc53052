"""The published judge's floors: what n real MNIST images it never saw score, over several subsets.

    python experiments/floors.py                       # n = 200, 500, 1000, 5000; 10 subsets each (about 2 min)
    python experiments/floors.py --n 1000 --subsets 20 --json floors.json

A floor is what a perfect generator would score at that n: the n real images replace the samples
in every metric (feature-FID against the 10,000 test images' statistics, precision/recall against
n test images, the confident share), with the same subsets evaluate.py --metrics --seed S draws.
Subset s uses seed s; for n = 5000 the subsets of the 10,000 held-out images overlap.
"""
import time

import common  # first: the repo's modules onto sys.path

# isort: split
import torch

import config
import metrics
from dataloader import mnist_tensors

METRICS = ("fid", "precision", "recall", "confidence")


class RealFeatures:
    """The judge's features (and logits) of the held-out and the test images, computed once for every n."""

    def __init__(self, judge, data_dir):
        held_out, _ = metrics.held_out_images(data_dir)
        x_test, _ = mnist_tensors(data_dir, train=False, verbose=False)
        self.held, self.test = metrics.features(judge.model, held_out), metrics.features(judge.model, x_test)
        with torch.no_grad():
            self.held_logits = judge.model.head(self.held)  # = predict(): eval-mode dropout is the identity
        self.ref = judge.reference


def floors(real, n, subsets):
    """{metric: [value per subset]} for n real held-out images, subsets seeded 0..subsets-1."""
    out = {k: [] for k in METRICS}
    for seed in range(subsets):
        i_real, i_test = metrics.real_subsets(n, seed, len(real.held), len(real.test))
        p, r = metrics.precision_recall(real.test[i_test], real.held[i_real])
        out["fid"].append(metrics.fid_from_stats(metrics.feature_stats(real.held[i_real]), real.ref))
        out["precision"].append(p)
        out["recall"].append(r)
        out["confidence"].append(metrics.scores_from_logits(real.held_logits[i_real])["confidence"])
    return out


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--n", type=config.int_list, default="200,500,1000,5000",
                   help="comma-separated set sizes (10 to 10000)")
    p.add_argument("--subsets", type=int, default=10, help="real subsets per n (seeds 0..subsets-1)")
    p.add_argument("--data_dir", default="./data")
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args(argv)
    if not all(10 <= n <= 10000 for n in args.n) or args.subsets < 2:
        raise common.UserError("--n values must be in 10..10000 and --subsets >= 2")
    judge, t0 = metrics.Judge(), time.time()
    real = RealFeatures(judge, args.data_dir)
    table = {n: floors(real, n, args.subsets) for n in args.n}
    print(f"floors of the {judge.label}, {args.subsets} subsets of held-out images per n (mean +- std):")
    print("| n | " + " | ".join(METRICS) + " |\n| --- |" + " --- |" * len(METRICS))
    for n, vals in table.items():
        print(f"| {n} | " + " | ".join("{:.3f} +- {:.3f}".format(*common.mean_std(vals[k])) for k in METRICS) + " |")
    record = common.stamp({"judge_sha256": judge.sha256, "subsets": args.subsets, "seconds": round(time.time() - t0),
                           "floors": {str(n): vals for n, vals in table.items()}})
    print(f"{record['seconds']} s on {record['cpu']}, torch {record['torch']}, commit {record['commit']}")
    if args.json:
        common.write_json(args.json, record)


if __name__ == "__main__":
    common.run_main(main)
