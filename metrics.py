"""Offline sample-quality metrics for MNIST.

The judge is a small CNN classifier owned by this repo (`MNISTClassifier`), trained on the MNIST
training set in a couple of minutes on 2 CPU cores. Inception-v3 FID needs weights from the
internet and was built for 299x299 colour photos; a classifier trained on MNIST itself sees what
matters for digits. Its 128-d penultimate layer is the feature space for feature-FID.

    python metrics.py --train_classifier      # (re)train and cache the judge
"""
import hashlib
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
from utils import OneLineArgumentParser, atomic_write, run_main

CLASSIFIER_FILE = "mnist_classifier.pt"


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


def _as_input(images):
    """uint8 (N, 28, 28) or float (N, 1, 28, 28) in [0, 1] -> float (N, 1, 28, 28)."""
    if images.dtype == torch.uint8:
        return images.float().div(255.0).unsqueeze(1)
    return images.float().reshape(-1, 1, 28, 28)


def train_classifier(data_dir="./data", epochs=2, batch_size=128, lr=2e-3, seed=0, progress=True):
    """Adam with one-cycle decay, light shift augmentation. Returns (model, test accuracy)."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    x, y = mnist_tensors(data_dir, train=True)
    model = MNISTClassifier()
    steps = epochs * (len(x) // batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    bar = tqdm(total=steps, desc="classifier", disable=not progress)
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
    model.eval()
    xt, yt = mnist_tensors(data_dir, train=False)
    acc = (predict(model, xt).argmax(1) == yt).float().mean().item()
    return model, acc


@torch.no_grad()
def predict(model, images, batch_size=1000):
    """Logits (N, 10) for uint8 (N, 28, 28) or float [0, 1] images."""
    model.eval()
    return torch.cat([model(_as_input(images[i:i + batch_size])) for i in range(0, len(images), batch_size)])


@torch.no_grad()
def features(model, images, batch_size=1000):
    """Penultimate features (N, 128)."""
    model.eval()
    return torch.cat([model.features(_as_input(images[i:i + batch_size])) for i in range(0, len(images), batch_size)])


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_classifier(data_dir="./data", retrain=False, progress=True):
    """The cached judge (<data_dir>/mnist_classifier.pt, with its SHA-256 beside it), trained if
    missing, if its checksum does not match, or if retrain. Returns (model, test accuracy)."""
    path = os.path.join(data_dir, CLASSIFIER_FILE)
    if not retrain and os.path.exists(path) and os.path.exists(path + ".sha256"):
        with open(path + ".sha256") as f:
            ok = f.read().split()[0] == _sha256(path)
        if ok:
            ckpt = checkpoint.load_file(path)
            model = MNISTClassifier()
            model.load_state_dict(ckpt["model"])
            return model.eval(), ckpt["test_accuracy"]
        print(f"{path} does not match its checksum; retraining the classifier")
    t0 = time.time()
    model, acc = train_classifier(data_dir, progress=progress)
    print(f"trained the MNIST classifier in {time.time() - t0:.0f} s: test accuracy {acc:.4f}")
    os.makedirs(data_dir, exist_ok=True)
    checkpoint.save(path, {"model": model.state_dict(), "test_accuracy": acc})
    digest = _sha256(path)
    atomic_write(path + ".sha256", lambda f: f.write(f"{digest}  {CLASSIFIER_FILE}\n".encode()))
    return model, acc


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


def classifier_scores(model, images, threshold=0.9):
    """Share of confident samples (max softmax >= threshold), the predicted-class histogram and
    its KL divergence to uniform (nats; 0 = every digit equally often, log 10 = one digit only)."""
    probs = predict(model, images).softmax(1)
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


def fid(feats_a, feats_b):
    return fid_from_stats(feature_stats(feats_a), feature_stats(feats_b))


def precision_recall(real, fake, k=3, batch=1000):
    """Improved precision and recall (Kynkaanniemi et al. 2019): each set's manifold is the union
    of balls around its points with radius the distance to the k-th nearest neighbour. Precision:
    share of fake points inside the real manifold; recall: share of real points inside the fake one."""
    def radii(x):
        d = torch.cat([torch.cdist(x[i:i + batch], x) for i in range(0, len(x), batch)])
        return d.kthvalue(k + 1, dim=1).values  # +1: the point itself is at distance 0

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
    edges = torch.linspace(1, T, k + 1).round().long()  # strata [edges[j], edges[j+1])
    sizes = (edges[1:] - edges[:-1]).double()
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    gcpu = torch.Generator().manual_seed(seed)
    model.eval()
    prior, decoder, terms, ranges = [], [], [], []
    n_batches = (len(images) + batch_size - 1) // batch_size
    bar = tqdm(total=n_batches * (k + 1), desc="bits/dim", disable=not progress)
    for i in range(0, len(images), batch_size):
        x0 = to_model_range(images[i:i + batch_size].to(device).float() / 255.0).unsqueeze(1)
        B = x0.shape[0]
        prior.append(diffusion.prior_bpd(x0).double().cpu())
        t0 = torch.zeros(B, dtype=torch.long, device=device)
        noise = torch.randn(x0.shape, generator=g, device=device)
        decoder.append(diffusion.vb_term_bpd(model, x0, t0, noise).double().cpu())
        total, by_range = torch.zeros(B, dtype=torch.float64), torch.zeros(B, 10, dtype=torch.float64)
        bar.update(1)
        for j in range(k):
            lo, hi = edges[j].item(), edges[j + 1].item()
            t = torch.randint(lo, hi, (B,), generator=gcpu)
            term = diffusion.vb_term_bpd(model, x0, t.to(device), torch.randn(x0.shape, generator=g, device=device))
            w = term.double().cpu() * sizes[j]
            total += w
            by_range.index_add_(1, torch.tensor([min(9, (lo * 10) // T)]), w[:, None])
            bar.update(1)
        terms.append(total)
        ranges.append(by_range)
    bar.close()
    prior, decoder, terms, ranges = map(torch.cat, (prior, decoder, terms, ranges))
    per_image = prior + decoder + terms
    n = len(per_image)
    return {"bpd": per_image.mean().item(),
            "bpd_se": (per_image.std().item() / math.sqrt(n)) if n > 1 else float("nan"),
            "prior": prior.mean().item(), "decoder": decoder.mean().item(), "terms": terms.mean().item(),
            "n_images": n, "n_timesteps": k, "exact_sum": k == T - 1,
            "breakdown": {f"t in [{max(1, r * T // 10)}, {(r + 1) * T // 10})": ranges[:, r].mean().item()
                          for r in range(10)}}


def reference_stats(clf, data_dir, digest):
    """Feature mean and covariance of the 10,000 MNIST test images, cached beside the classifier."""
    path = os.path.join(data_dir, "mnist_test_feature_stats.pt")
    if os.path.exists(path):
        cached = checkpoint.load_file(path)
        if cached.get("classifier_sha256") == digest:
            return cached["mean"], cached["cov"]
    xt, _ = mnist_tensors(data_dir, train=False, verbose=False)
    mean, cov = feature_stats(features(clf, xt))
    checkpoint.save(path, {"mean": mean, "cov": cov, "classifier_sha256": digest})
    return mean, cov


class TrainingJudge:
    """The judge, loaded once, scoring samples while a model trains (run.py --eval_every): feature-FID
    against the MNIST test set's statistics, and the confident share. Loading (or, the first time,
    training) the classifier runs under a forked random state, so that the training streams are
    untouched. FID at a few hundred samples is biased upwards against n = 1000: compare it only
    along one curve, or between runs with the same --eval_samples."""

    def __init__(self, data_dir="./data", progress=True):
        with torch.random.fork_rng(devices=[]):
            self.clf, _ = load_classifier(data_dir, progress=progress)
            self.ref = reference_stats(self.clf, data_dir, _sha256(os.path.join(data_dir, CLASSIFIER_FILE)))

    @torch.no_grad()
    def __call__(self, samples):
        """uint8 samples (N, 28, 28) -> {"fid", "confidence"}."""
        return {"fid": fid_from_stats(feature_stats(features(self.clf, samples)), self.ref),
                "confidence": classifier_scores(self.clf, samples)["confidence"]}


def sample_metrics(samples, data_dir="./data", seed=0, progress=True, labels=None):
    """All sample-quality numbers for uint8 samples (N, 28, 28), with their real-data floors.

    labels: (N,) the digit each sample was asked to be (-1 = none), for a class-conditional model:
    adds conditional_accuracy (the classifier agrees with the request) and its value per digit."""
    clf, acc = load_classifier(data_dir, progress=progress)
    digest = _sha256(os.path.join(data_dir, CLASSIFIER_FILE))
    n = len(samples)
    g = torch.Generator().manual_seed(seed)
    x_train, _ = mnist_tensors(data_dir, train=True, verbose=False)
    x_test, _ = mnist_tensors(data_dir, train=False, verbose=False)
    real_train = x_train[torch.randperm(len(x_train), generator=g)[:n]]
    real_test = x_test[torch.randperm(len(x_test), generator=g)[:n]]
    ref = reference_stats(clf, data_dir, digest)
    f_fake, f_train, f_test = features(clf, samples), features(clf, real_train), features(clf, real_test)
    precision, recall = precision_recall(f_test, f_fake)
    floor_p, floor_r = precision_recall(f_test, f_train)
    out = {"n_samples": n, "classifier_test_accuracy": acc,
           "fid": fid_from_stats(feature_stats(f_fake), ref),
           "fid_floor": fid_from_stats(feature_stats(f_train), ref),
           "precision": precision, "recall": recall,
           "precision_floor": floor_p, "recall_floor": floor_r}
    out.update(classifier_scores(clf, samples))
    if labels is not None:
        out.update(conditional_accuracy(predict(clf, samples).argmax(1), torch.as_tensor(labels)))
    real_scores = classifier_scores(clf, real_train)
    out["confidence_floor"], out["kl_to_uniform_floor"] = real_scores["confidence"], real_scores["kl_to_uniform"]
    return out


def main(argv=None):
    p = OneLineArgumentParser(description="Train and cache the MNIST classifier used by the metrics.")
    p.add_argument("--data_dir", default="./data")
    p.add_argument("--train_classifier", action="store_true", help="retrain even if a cached one exists")
    args = p.parse_args(argv)
    _, acc = load_classifier(args.data_dir, retrain=args.train_classifier)
    print(f"classifier test accuracy: {acc:.4f}")


if __name__ == "__main__":
    run_main(main)
