"""Offline sample-quality metrics for MNIST, scored by one published judge.

The judge is a small CNN classifier owned by this repo (`MNISTClassifier`), trained once on the
first 50,000 MNIST training images and published as `checkpoints/mnist_judge.pt` (its SHA-256 is
pinned below and beside it). Every metric loads that file, so the same samples give the same
numbers on every machine; the 10,000 training images it never saw are the real data of the
floors. Inception-v3 FID needs weights from the internet and was built for 299x299 colour photos;
a classifier trained on MNIST itself sees what matters for digits. Its 128-d penultimate layer is
the feature space for feature-FID. It scores in float64, so that the thread count and the CPU's
vector width move no metric beyond 1e-4.

    python metrics.py                                        # check the published judge, print its record
    python metrics.py --train_judge --out my_judge.pt        # train your own (evaluate.py --judge my_judge.pt)
"""
import math
import os
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
from dataloader import epoch_permutation, mnist_tensors
from utils import OneLineArgumentParser, UserError, cpu_model, git_commit, run_main

REPO = os.path.dirname(os.path.abspath(__file__))
JUDGE_FILE = os.path.join(REPO, "checkpoints", "mnist_judge.pt")
# The published judge's SHA-256 (tests/test_judge.py pins it too).
JUDGE_SHA256 = "b9ecc7d901b18ee3efe345a4f9b710a06c726348b345b3aa904406327397282c"
JUDGE_TRAIN_IMAGES = 50_000  # the judge trains on training images [0, 50000); [50000, 60000) are held out
TRAIN_COMMAND = "python metrics.py --train_judge --out FILE"
JUDGE_KEYS = ("model", "test_accuracy", "ref_mean", "ref_cov", "train_images", "command")


class MNISTClassifier(nn.Module):
    """Two conv stages (28 -> 14 -> 7) and a 128-d feature layer. Input: (B, 1, 28, 28) in [0, 1]."""

    def __init__(self):
        super().__init__()

        def stage(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.MaxPool2d(2))

        self.conv = nn.Sequential(stage(1, 32), stage(32, 64))
        self.fc = nn.Linear(64 * 7 * 7, 128)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(128, 10)

    def features(self, x):
        """(B, 1, 28, 28) in [0, 1] -> (B, 128) penultimate features."""
        x = (x - 0.1307) / 0.3081  # the MNIST mean and std
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x):
        return self.head(self.drop(self.features(x)))


def _as_input(images, dtype=torch.float32):
    """uint8 (N, 28, 28) or float (N, 1, 28, 28) in [0, 1] -> (N, 1, 28, 28) of dtype."""
    if images.dtype == torch.uint8:
        return images.to(dtype).div(255.0).unsqueeze(1)
    return images.to(dtype).reshape(-1, 1, 28, 28)


def train_classifier(data_dir="./data", epochs=2, batch_size=128, lr=2e-3, seed=0, progress=True):
    """Adam with one-cycle decay, light shift augmentation, on the first JUDGE_TRAIN_IMAGES training
    images (all of them if the data has fewer). Returns (the model in eval mode, images trained on)."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    x, y = mnist_tensors(data_dir, train=True)
    x, y = x[:JUDGE_TRAIN_IMAGES], y[:JUDGE_TRAIN_IMAGES]
    if len(x) < batch_size:
        raise UserError(f"{data_dir} has {len(x)} training images; a judge needs at least {batch_size}")
    model = MNISTClassifier()
    steps = epochs * (len(x) // batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    bar = tqdm(total=steps, desc="judge", disable=not progress)
    for epoch in range(epochs):
        perm = epoch_permutation(seed, epoch, len(x))
        for i in range(len(x) // batch_size):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            xb = _as_input(x[idx])
            shift = torch.randint(-2, 3, (2,)).tolist()  # random translation by up to 2 pixels
            xb = torch.roll(xb, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    return model.eval(), len(x)


@torch.no_grad()
def predict(model, images, batch_size=200, features=False):
    """Logits (N, 10), or with `features` the penultimate features (N, 128), for uint8 (N, 28, 28) or
    float [0, 1] images, in the model's dtype."""
    model.eval()
    dtype, fn = next(model.parameters()).dtype, model.features if features else model
    return torch.cat([fn(_as_input(images[i:i + batch_size], dtype)) for i in range(0, len(images), batch_size)])


def features(model, images, batch_size=200):
    return predict(model, images, batch_size, features=True)


class Judge:
    """The classifier that scores samples, loaded from a file and checked before use.

    The published file (checkpoints/mnist_judge.pt) must have the pinned SHA-256. Any other file
    (`--judge FILE`, from `python metrics.py --train_judge`) must match the .sha256 written beside
    it, and is labelled "local" in every table it scores. Nothing is ever retrained here.
    Attributes: model (float64, eval), record (how it was trained), sha256, published, label."""

    def __init__(self, path=None):
        path = JUDGE_FILE if path is None else path
        published = os.path.abspath(path) == os.path.abspath(JUDGE_FILE)
        retrain = TRAIN_COMMAND.replace("FILE", "my_judge.pt")
        fix = ("restore it with 'git checkout -- checkpoints/mnist_judge.pt', or train your own with "
               f"'{retrain}' and pass --judge my_judge.pt" if published else
               f"retrain it with '{retrain}' and pass --judge my_judge.pt")
        if not os.path.isfile(path):
            raise UserError(f"the judge {path!r} does not exist; {fix}")
        try:
            digest = checkpoint.sha256_file(path)
        except OSError as e:
            raise UserError(f"cannot read the judge {path}: {e.strerror}") from None
        expected = JUDGE_SHA256 if published else _sha256_beside(path, fix)
        if digest != expected:
            raise UserError(f"the judge {path} has SHA-256 {digest[:16]}..., expected {expected[:16]}... "
                            f"(altered or truncated); {fix}")
        ckpt = checkpoint.load_file(path)
        if not isinstance(ckpt, dict) or not all(k in ckpt for k in JUDGE_KEYS):
            raise UserError(f"{path} is not a judge file (it lacks {', '.join(JUDGE_KEYS)}); {fix}")
        self.model = MNISTClassifier()
        checkpoint.load_weights(self.model, ckpt["model"], f"the judge {path}")
        self.model.double().eval()
        self.record = {k: v for k, v in ckpt.items() if k != "model"}
        # the judge's accuracy on the MNIST test images, and their features' (mean, covariance): the FID reference
        self.test_accuracy, self.reference = ckpt["test_accuracy"], (ckpt["ref_mean"], ckpt["ref_cov"])
        self.sha256, self.published, self.path = digest, digest == JUDGE_SHA256, path
        self.label = ("published judge" if self.published else f"LOCAL judge {os.path.basename(path)}") + \
            f" (sha256 {digest[:12]})"


def _sha256_beside(path, fix):
    try:
        with open(path + ".sha256") as f:
            return f.read().split()[0]
    except (OSError, IndexError, UnicodeDecodeError):
        raise UserError(f"the judge {path} has no readable {path}.sha256 beside it; {fix}") from None


def record_test_set(model, data_dir):
    """What the judge records of the 10,000 MNIST test images, scored in the model's dtype (float64 when
    written, as the metrics score): its accuracy and the feature mean and covariance (the FID reference)."""
    xt, yt = mnist_tensors(data_dir, train=False, verbose=False)
    f = features(model.eval(), xt)
    with torch.no_grad():
        acc = (model.head(f).argmax(1) == yt).double().mean().item()  # eval: dropout is the identity
    mean, cov = feature_stats(f)
    return {"test_accuracy": acc, "ref_mean": mean.double(), "ref_cov": cov.double()}


def write_judge(out, data_dir="./data", seed=0, progress=True, command=None):
    """Train a judge and write it to `out` with its record (command, seed, commit, CPU, torch, the
    test-set accuracy and FID reference statistics) and a .sha256 file beside it. Returns the record."""
    t0 = time.time()
    model, n_images = train_classifier(data_dir, seed=seed, progress=progress)
    seconds = time.time() - t0
    record = {"command": command or f"{TRAIN_COMMAND.replace('FILE', out)} --seed {seed}", "seed": seed,
              "commit": git_commit(), "cpu": cpu_model(), "threads": torch.get_num_threads(),
              "torch": str(torch.__version__), "train_images": f"MNIST training images [0, {n_images})",
              "train_seconds": round(seconds, 1), **record_test_set(model.double(), data_dir)}
    model.float()
    checkpoint.save_published(out, {"model": model.state_dict(), **record})
    return record


def conditional_accuracy(predicted, requested, num_classes=10):
    """Share of samples whose predicted class is the requested digit (requests of -1 ignored),
    overall and per digit (None for a digit never requested)."""
    asked = requested >= 0
    if not asked.any():
        raise ValueError("no sample has a requested digit")
    hit = (predicted[asked] == requested[asked]).double()
    per_digit = [hit[requested[asked] == d].mean().item() if (requested[asked] == d).any() else None
                 for d in range(num_classes)]
    return {"conditional_accuracy": hit.mean().item(), "conditional_accuracy_per_digit": per_digit}


def scores_from_logits(logits, threshold=0.9):
    """From the judge's logits (N, 10) (its `head` of the features: in eval mode dropout is the identity):
    the share of confident samples (max softmax >= threshold), the predicted-class histogram and its
    KL divergence to uniform (nats; 0 = every digit equally often, log 10 = one digit only)."""
    probs = logits.softmax(1)
    conf = (probs.max(1).values >= threshold).float().mean().item()
    hist = torch.bincount(probs.argmax(1), minlength=10).double()
    p = hist / hist.sum()
    kl = (p[p > 0] * (p[p > 0] * 10).log()).sum().item()
    return {"confidence": conf, "class_histogram": hist.long().tolist(), "kl_to_uniform": kl}


# ---- feature-space FID and precision / recall -------------------------------------------
def feature_stats(feats):
    f = feats.double()
    return f.mean(0), torch.cov(f.T)


def fid_from_stats(a, b):
    """Frechet distance between Gaussians N(mu1, S1) and N(mu2, S2):
    |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al. 2017)."""
    from scipy import linalg

    (m1, s1), (m2, s2) = a, b
    with warnings.catch_warnings():  # ReLU features give singular covariances; handled below
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(s1.numpy() @ s2.numpy())
        if not np.isfinite(covmean).all():  # as pytorch-fid: regularise the product and retry
            eps = 1e-6 * np.eye(len(s1))
            covmean = linalg.sqrtm((s1.numpy() + eps) @ (s2.numpy() + eps))
    covmean = np.real(covmean)  # tiny imaginary parts from numerical error
    return float((m1 - m2).pow(2).sum() + torch.trace(s1 + s2) - 2 * np.trace(covmean))


def precision_recall(real, fake, k=3, batch=1000):
    """Improved precision and recall (Kynkaanniemi et al. 2019): each set's manifold is the union
    of balls around its points with radius the distance to the k-th nearest neighbour. Precision:
    share of fake points inside the real manifold; recall: share of real points inside the fake one."""
    def radii(x):  # +1: the point itself is at distance 0
        return torch.cat([torch.cdist(x[i:i + batch], x).kthvalue(k + 1, dim=1).values
                          for i in range(0, len(x), batch)])

    def inside(points, centres, r):
        return torch.cat([(torch.cdist(points[i:i + batch], centres) <= r[None]).any(1)
                          for i in range(0, len(points), batch)]).float().mean().item()

    real, fake = real.double(), fake.double()
    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


# ---- negative log-likelihood bound in bits/dim -----------------------------------------------
@torch.no_grad()
def nll_bpd(model, diffusion, images, n_timesteps=None, batch_size=128, seed=0, progress=True):
    """The variational bound L_T + sum_{t>=1} L_t + L_0 (eq. 5, section 3.3) in bits/dim, per image.

    images: uint8 (N, 28, 28). With n_timesteps < T, the T-1 KL terms are estimated by stratified
    sampling: {1..T-1} is cut into n_timesteps equal strata, one t drawn uniformly in each and
    weighted by the stratum's size, independently per image. That is unbiased for the sum;
    the standard error is taken over images, so it covers both the images and the t draws.
    Returns a dict: bpd, bpd_se, prior (L_T), decoder (L_0), terms (the KL sum), n_images,
    n_timesteps, and breakdown (bits/dim in 10 equal ranges of t).
    """
    from tqdm.auto import tqdm

    from diffusion import to_model_range

    T = diffusion.T
    k = T - 1 if not n_timesteps or n_timesteps >= T - 1 else n_timesteps
    edges = torch.linspace(1, T, k + 1).round().long().tolist()  # strata [edges[j], edges[j+1])
    device = next(model.parameters()).device
    g, gcpu = torch.Generator(device=device).manual_seed(seed), torch.Generator().manual_seed(seed)
    model.eval()
    batches = []  # per batch of B images: prior (B,), decoder (B,), the KL sum (B,), the KL sum by range of t (B, 10)
    bar = tqdm(total=-(-len(images) // batch_size) * (k + 1), desc="bits/dim", disable=not progress)
    for i in range(0, len(images), batch_size):
        x0 = to_model_range(images[i:i + batch_size].to(device).float() / 255.0).unsqueeze(1)
        B = x0.shape[0]
        prior = diffusion.prior_bpd(x0).cpu().double()
        t0 = torch.zeros(B, dtype=torch.long, device=device)
        decoder = diffusion.vb_term_bpd(model, x0, t0, torch.randn(x0.shape, generator=g, device=device))
        total, by_range = torch.zeros(B, dtype=torch.float64), torch.zeros(B, 10, dtype=torch.float64)
        bar.update(1)
        for lo, hi in zip(edges[:-1], edges[1:]):
            t = torch.randint(lo, hi, (B,), generator=gcpu)
            term = diffusion.vb_term_bpd(model, x0, t.to(device), torch.randn(x0.shape, generator=g, device=device))
            w = term.cpu().double() * (hi - lo)  # weighted by the stratum's size
            total += w
            by_range[:, min(9, (lo * 10) // T)] += w
            bar.update(1)
        batches.append((prior, decoder.cpu().double(), total, by_range))
    bar.close()
    prior, decoder, terms, ranges = (torch.cat(parts) for parts in zip(*batches))
    per_image = prior + decoder + terms
    n = len(per_image)
    return {"bpd": per_image.mean().item(),
            "bpd_se": (per_image.std().item() / math.sqrt(n)) if n > 1 else float("nan"),
            "prior": prior.mean().item(), "decoder": decoder.mean().item(), "terms": terms.mean().item(),
            "n_images": n, "n_timesteps": k, "exact_sum": k == T - 1,
            "breakdown": {f"t in [{max(1, r * T // 10)}, {(r + 1) * T // 10})": ranges[:, r].mean().item()
                          for r in range(10)}}


def held_out_images(data_dir):
    """Real images the judge never saw: MNIST training images [50000, 60000). With data that is not
    the full MNIST (fewer images), all training images, and a source string that says so."""
    x_train, _ = mnist_tensors(data_dir, train=True, verbose=False)
    if len(x_train) > JUDGE_TRAIN_IMAGES:
        return x_train[JUDGE_TRAIN_IMAGES:], f"MNIST training images [{JUDGE_TRAIN_IMAGES}, {len(x_train)})"
    return x_train, f"all {len(x_train)} training images (not MNIST's 60,000: none held out from the judge)"


class TrainingJudge:
    """The published judge, loaded once, scoring samples while a model trains (run.py --eval_every):
    feature-FID against the MNIST test set's statistics, and the confident share. Loading runs under
    a forked random state, so that the training streams are untouched. FID at a few hundred samples
    is biased upwards against n = 1000: compare it only along one curve, or between runs with the
    same --eval_samples."""

    def __init__(self, judge_path=None):
        with torch.random.fork_rng(devices=[]):  # building the network draws its initial weights
            self.judge = Judge(judge_path)

    @torch.no_grad()
    def __call__(self, samples):
        """uint8 samples (N, 28, 28) -> {"fid", "confidence"}."""
        f = features(self.judge.model, samples)
        return {"fid": fid_from_stats(feature_stats(f), self.judge.reference),
                "confidence": scores_from_logits(self.judge.model.head(f))["confidence"]}


def real_subsets(n, seed, n_held_out, n_test):
    """The real images a score at n uses, drawn by seed: indices of n held-out images (the floor)
    and of n test images (the reference of precision/recall)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_held_out, generator=g)[:n], torch.randperm(n_test, generator=g)[:n]


def sample_metrics(samples, data_dir="./data", seed=0, labels=None, judge=None):
    """All sample-quality numbers for uint8 samples (N, 28, 28), with their real-data floors.

    The floors score n real images the judge never saw (held_out_images), drawn by `seed`, exactly
    as the samples are scored: feature-FID against the test set's statistics, precision/recall
    against n test images (the same ones for samples and floor), the confident share.
    labels: (N,) the digit each sample was asked to be (-1 = none), for a class-conditional model:
    adds conditional_accuracy (the judge agrees with the request) and its value per digit.
    judge: a Judge (default: the published one)."""
    judge = judge or Judge()
    clf, n = judge.model, len(samples)
    held_out, source = held_out_images(data_dir)
    x_test, _ = mnist_tensors(data_dir, train=False, verbose=False)
    i_real, i_test = real_subsets(n, seed, len(held_out), len(x_test))
    real = held_out[i_real]
    ref = judge.reference
    f_fake, f_real, f_test = features(clf, samples), features(clf, real), features(clf, x_test[i_test])
    precision, recall = precision_recall(f_test, f_fake)
    floor_p, floor_r = precision_recall(f_test, f_real)
    out = {"n_samples": n, "judge": judge.label, "judge_sha256": judge.sha256, "judge_published": judge.published,
           "classifier_test_accuracy": judge.test_accuracy, "floor_images": source, "real_subsets_seed": seed,
           "fid": fid_from_stats(feature_stats(f_fake), ref),
           "fid_floor": fid_from_stats(feature_stats(f_real), ref),
           "precision": precision, "recall": recall,
           "precision_floor": floor_p, "recall_floor": floor_r}
    with torch.no_grad():  # the logits from the features: one pass of the network per set
        logits, real_logits = clf.head(f_fake), clf.head(f_real)
    out.update(scores_from_logits(logits))
    if labels is not None:
        out.update(conditional_accuracy(logits.argmax(1), torch.as_tensor(labels)))
    real_scores = scores_from_logits(real_logits)
    out["confidence_floor"], out["kl_to_uniform_floor"] = real_scores["confidence"], real_scores["kl_to_uniform"]
    return out


def main(argv=None):
    p = OneLineArgumentParser(description="Check the published MNIST judge, or train your own.")
    p.add_argument("--train_judge", action="store_true", help=f"train a judge on MNIST training images "
                   f"[0, {JUDGE_TRAIN_IMAGES}) (2-3 min on 2 CPU cores) and write it to --out")
    p.add_argument("--out", help="with --train_judge: the file to write (a .sha256 goes beside it); an existing "
                   "file is kept unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="with --train_judge: replace an existing --out")
    p.add_argument("--seed", type=int, help="with --train_judge: the training seed (default 0)")
    p.add_argument("--judge", help="without --train_judge: the judge file to check (default: the published one)")
    p.add_argument("--data_dir", help="with --train_judge: where MNIST is (or is put; default ./data)")
    p.add_argument("--no_progress", action="store_true", help="with --train_judge: no progress bar")
    args = p.parse_args(argv)
    if not args.train_judge:
        for f in ("out", "overwrite", "seed", "data_dir", "no_progress"):
            if getattr(args, f) is not None and getattr(args, f) is not False:
                raise UserError(f"--{f} is for --train_judge")
        judge = Judge(args.judge)
        print(f"{judge.path}: {judge.label}")
        for k, v in judge.record.items():
            print(f"  {k}: {tuple(v.shape) if torch.is_tensor(v) else v}")
        return
    if args.judge is not None:
        raise UserError("--judge checks an existing judge; drop it with --train_judge (the new one goes to --out)")
    if not args.out:
        raise UserError(f"--train_judge needs --out FILE (the published judge is {os.path.relpath(JUDGE_FILE)})")
    checkpoint.check_publish_target(args.out, args.overwrite)
    record = write_judge(args.out, args.data_dir or "./data", seed=args.seed or 0, progress=not args.no_progress)
    print(f"wrote {args.out} and {args.out}.sha256: test accuracy {record['test_accuracy']:.4f}, "
          f"trained in {record['train_seconds']:.0f} s; score with it by --judge {args.out}")


if __name__ == "__main__":
    run_main(main)
