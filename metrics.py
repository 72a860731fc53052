"""Offline sample-quality metrics for MNIST.

The judge is a small CNN classifier owned by this repo (`MNISTClassifier`), trained on the MNIST
training set in a couple of minutes on 2 CPU cores. Inception-v3 FID needs weights from the
internet and was built for 299x299 colour photos; a classifier trained on MNIST itself sees what
matters for digits. Its 128-d penultimate layer is the feature space for feature-FID.

    python metrics.py --train_classifier      # (re)train and cache the judge
"""
import hashlib
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dataloader import epoch_permutation, mnist_tensors
from utils import OneLineArgumentParser, UserError, atomic_write, run_main

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
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            model = MNISTClassifier()
            model.load_state_dict(ckpt["model"])
            return model.eval(), ckpt["test_accuracy"]
        print(f"{path} does not match its checksum; retraining the classifier")
    t0 = time.time()
    model, acc = train_classifier(data_dir, progress=progress)
    print(f"trained the MNIST classifier in {time.time() - t0:.0f} s: test accuracy {acc:.4f}")
    os.makedirs(data_dir, exist_ok=True)
    atomic_write(path, lambda f: torch.save({"model": model.state_dict(), "test_accuracy": acc}, f))
    digest = _sha256(path)
    atomic_write(path + ".sha256", lambda f: f.write(f"{digest}  {CLASSIFIER_FILE}\n".encode()))
    return model, acc


def classifier_scores(model, images, threshold=0.9):
    """Share of confident samples (max softmax >= threshold), the predicted-class histogram and
    its KL divergence to uniform (nats; 0 = every digit equally often, log 10 = one digit only)."""
    probs = predict(model, images).softmax(1)
    conf = (probs.max(1).values >= threshold).float().mean().item()
    hist = torch.bincount(probs.argmax(1), minlength=10).double()
    p = hist / hist.sum()
    kl = (p[p > 0] * (p[p > 0] * 10).log()).sum().item()
    return {"confidence": conf, "class_histogram": hist.long().tolist(), "kl_to_uniform": kl}


def main(argv=None):
    p = OneLineArgumentParser(description="Train and cache the MNIST classifier used by the metrics.")
    p.add_argument("--data_dir", default="./data")
    p.add_argument("--train_classifier", action="store_true", help="retrain even if a cached one exists")
    args = p.parse_args(argv)
    _, acc = load_classifier(args.data_dir, retrain=args.train_classifier)
    print(f"classifier test accuracy: {acc:.4f}")


if __name__ == "__main__":
    run_main(main)
