"""Class-conditional training and classifier-free guidance (Ho & Salimans 2022)."""
import argparse
import os

import numpy as np
import pytest
import torch

import evaluate
import run
from checkpoint import build_model
from checkpoint import load as load_checkpoint
from config import TrainConfig
from conftest import TINY, TINY_FLAGS, fake_digits, short_chain, undo_zero_init, write_tiny_mnist
from diffusion import GaussianDiffusion
from metrics import conditional_accuracy
from model import UNet
from sample import guided, label_kwargs, sample_func
from samplers import SAMPLERS
from train import train_func
from utils import UserError

NULL = 10


class StubNet(torch.nn.Module):
    """eps(x, t, y) = y (as a float image): guidance arithmetic can be read off the output."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x, t, y):
        self.calls += 1
        return y.float().view(-1, 1, 1, 1).expand_as(x).clone()


def test_guidance_arithmetic_on_a_stub_network():
    net, x, t = StubNet(), torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.long)
    y = torch.tensor([0, 4, 9])
    for w in (0.0, 0.5, 2.0):
        out = guided(net, y, w, NULL)(x, t)
        expect = (1 + w) * y.float() - w * NULL  # eps = (1 + w) eps(x, y) - w eps(x, null)
        assert torch.allclose(out[:, 0, 0, 0], expect)
    net.calls = 0
    guided(net, y, 3.0, NULL)(x, t)
    assert net.calls == 1  # the conditional and the null pass run as one batch
    assert guided(net, None, 0.0, NULL) is net


def _cond_unet(seed=0):
    torch.manual_seed(seed)
    return UNet(**TINY, num_classes=10)


class LabelNet(torch.nn.Module):
    """A class-conditional network of one weight, eps(x, t, y) = w x, that records the labels it is trained on:
    the labels come from train_func's step, whatever the network (the UNet's compute would add only time)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.num_classes, self.model_args, self.seen = num_classes, {"num_classes": num_classes}, []
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y):
        self.seen.append(y.clone())
        return self.w * x


def _train_and_record_labels(p_uncond, steps=40, batch=16):
    images, labels = fake_digits(128, seed=0)
    images, labels = torch.from_numpy(images), torch.from_numpy(labels).long()
    model = LabelNet()
    cfg = TrainConfig(n_epochs=100, max_steps=steps, batch_size=batch, lr=1e-3, warmup=0, save_every=10 ** 6,
                      seed=0, p_uncond=p_uncond)
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"_cond_{os.getpid()}.pt")
    try:
        train_func(model, GaussianDiffusion(), images, cfg, path, progress=False, labels=labels)
    finally:
        if os.path.exists(path):
            os.remove(path)
    return torch.cat(model.seen), labels


def test_null_label_rate_during_training():
    y, _ = _train_and_record_labels(0.25)
    assert len(y) == 40 * 16
    rate = (y == NULL).double().mean().item()
    assert abs(rate - 0.25) < 0.06, rate  # 640 draws: the binomial SD is 0.017
    assert ((y >= 0) & (y <= NULL)).all() and len(set(y[y != NULL].tolist())) > 5


def test_p_uncond_zero_trains_on_the_true_labels_and_one_on_null_only():
    y, labels = _train_and_record_labels(0.0, steps=8)
    from dataloader import epoch_permutation
    perm = epoch_permutation(0, 0, 128)
    assert torch.equal(y, labels[perm[:8 * 16]])
    y, _ = _train_and_record_labels(1.0, steps=4)
    assert (y == NULL).all()


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_conditional_and_unconditional_sampling_shapes(sampler):
    model = _cond_unet()
    kw = dict(sampler=sampler, sampling_steps=None if sampler == "ddpm" else 10, progress=False, batch_size=3,
              diffusion=GaussianDiffusion(T=20))  # a short chain: the same loop, faster
    x, _ = sample_func(model, 5, labels=torch.tensor([0, 1, 2, 3, 4]), guidance_scale=2.0, **kw)
    assert x.shape == (5, 1, 28, 28) and torch.isfinite(x).all()
    x_null, _ = sample_func(model, 4, labels=torch.full((4,), NULL), **kw)
    assert x_null.shape == (4, 1, 28, 28)
    with pytest.raises(ValueError, match="labels are required"):
        sample_func(model, 2, **kw)
    with pytest.raises(ValueError, match="labels are required"):
        sample_func(UNet(**TINY), 2, labels=torch.tensor([1, 2]), **kw)


def test_label_embedding_changes_the_output_once_trained():
    model = _cond_unet()
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([5, 5])
    assert torch.equal(model(x, t, torch.tensor([1, 1])), model(x, t, torch.tensor([2, 2])))  # zero-init: ignored
    undo_zero_init(model, std=0.1)  # as if trained, the label embedding included
    assert not torch.allclose(model(x, t, torch.tensor([1, 1])), model(x, t, torch.tensor([2, 2])))
    with pytest.raises(ValueError, match="unconditional"):
        UNet(**TINY)(x, t, torch.tensor([1, 1]))


def _args(digits=None, w=None, seed=0):
    return argparse.Namespace(digits=digits, guidance_scale=w, seed=seed)


def test_digits_and_guidance_flags():
    out = label_kwargs(_args("3,7"), 10, 5)
    assert out["labels"].tolist() == [3, 7, 3, 7, 3] and out["guidance_scale"] == 0.0
    assert label_kwargs(_args(None, 1.5), 10, 12)["labels"].tolist() == list(range(10)) + [0, 1]
    assert label_kwargs(_args("none"), 10, 3)["labels"].tolist() == [NULL] * 3
    assert label_kwargs(_args(), None, 3) == {"labels": None, "guidance_scale": 0.0}
    drawn = label_kwargs(_args("random"), 10, 2000)["labels"]  # uniform over the digits, fixed by the seed
    assert torch.equal(drawn, label_kwargs(_args("random"), 10, 2000)["labels"])
    assert not torch.equal(drawn, label_kwargs(_args("random", seed=1), 10, 2000)["labels"])
    assert set(drawn.tolist()) == set(range(10)) and torch.bincount(drawn).min() > 150
    for bad, match in [(_args("3,x"), "--digits must be"), (_args("10"), "--digits must be"),
                       (_args("", None), "--digits must be"), (_args("1", -1.0), "must be >= 0"),
                       (_args("none", 2.0), "needs digits")]:
        with pytest.raises(UserError, match=match):
            label_kwargs(bad, 10, 4)
    with pytest.raises(UserError, match="class-conditional checkpoint"):
        label_kwargs(_args("1"), None, 4)


def test_conditional_accuracy():
    pred, asked = torch.tensor([1, 2, 3, 3, 5]), torch.tensor([1, 2, 4, -1, 5])
    r = conditional_accuracy(pred, asked)
    assert r["conditional_accuracy"] == pytest.approx(0.75)
    assert r["conditional_accuracy_per_digit"][1] == 1.0 and r["conditional_accuracy_per_digit"][4] == 0.0
    assert r["conditional_accuracy_per_digit"][0] is None  # never requested (and valid JSON)


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("cond")
    data = write_tiny_mnist(str(work / "data"))
    ckpt = str(work / "cond.pt")
    run.main(["--data_dir", data, *TINY_FLAGS, "--class_cond", "--p_uncond", "0.2", "--batch_size", "16",
              "--max_steps", "4", "--n_samples", "2", "--digits", "5", "--sampler", "ddim", "--sampling_steps", "3",
              "--no_progress", "--device", "cpu", "--checkpoint", ckpt, "--out_dir", str(work)])
    return work, ckpt


def test_class_cond_run_is_stored_and_evaluate_writes_labels(cond_run):
    work, ckpt = cond_run
    c = load_checkpoint(ckpt)
    assert c["model_args"]["num_classes"] == 10 and c["train_config"]["p_uncond"] == 0.2
    evaluate.main(["--checkpoint", ckpt, "--n_samples", "4", "--digits", "2,8", "--guidance_scale", "1",
                   "--sampler", "ddim", "--sampling_steps", "3", "--save_samples", str(work / "s.npz"),
                   "--out", str(work / "g.png"), "--no_progress", "--device", "cpu"])
    z = np.load(work / "s.npz")
    assert z["samples"].shape == (4, 28, 28) and z["labels"].tolist() == [2, 8, 2, 8]
    evaluate.main(["--checkpoint", ckpt, "--n_samples", "2", "--digits", "none", "--sampler", "ddim",
                   "--sampling_steps", "3", "--save_samples", str(work / "u.npz"), "--out", str(work / "u.png"),
                   "--no_progress", "--device", "cpu"])
    assert np.load(work / "u.npz")["labels"].tolist() == [-1, -1]


def test_class_cond_refusals(cond_run, tmp_path):
    work, ckpt = cond_run
    with pytest.raises(UserError, match="add --class_cond"):
        run.main(["--p_uncond", "0.2", "--dry_run", "--device", "cpu"])
    with pytest.raises(UserError, match="--digits must be"):
        run.main(["--class_cond", "--digits", "12", "--dry_run", "--device", "cpu"])
    uncond = str(tmp_path / "u.pt")
    m = UNet(**TINY)
    torch.save({"model_args": {k: v for k, v in m.model_args.items() if k != "num_classes"},
                "diffusion_args": GaussianDiffusion().args, "model": m.state_dict(), "ema": m.state_dict(),
                "optimizer": {}, "rng": {}, "train_config": {"batch_size": 16, "seed": 0}, "step": 1, "total_steps": 2},
               uncond)
    with pytest.raises(UserError, match="checkpoint is unconditional"):
        run.main(["--resume", "--class_cond", "--checkpoint", uncond, "--device", "cpu", "--out_dir", str(tmp_path)])
    with pytest.raises(UserError, match="class-conditional checkpoint"):
        evaluate.main(["--checkpoint", uncond, "--digits", "3", "--out", str(tmp_path / "x.png"), "--device", "cpu"])


def test_old_unconditional_checkpoint_without_num_classes_still_loads(tmp_path):
    m = UNet(**TINY)
    args = {k: v for k, v in m.model_args.items() if k != "num_classes"}  # written before class_cond existed
    path = str(tmp_path / "old.pt")
    torch.save({"model_args": args, "diffusion_args": GaussianDiffusion().args, "model": m.state_dict()}, path)
    model, _ = build_model(load_checkpoint(path))
    assert model.num_classes is None
    evaluate.main(["--checkpoint", path, "--n_samples", "2", "--sampler", "ddim", "--sampling_steps", "2",
                   "--out", str(tmp_path / "o.png"), "--save_samples", str(tmp_path / "o.npz"),
                   "--no_progress", "--device", "cpu"])
    assert np.load(tmp_path / "o.npz")["labels"].tolist() == [-1, -1]


def test_make_pics_guidance_panel(cond_run, tmp_path):
    import make_pics
    work, ckpt = cond_run
    ckpt = short_chain(ckpt, tmp_path / "short.pt", T=50)
    make_pics.main(["--checkpoint", ckpt, "--out_dir", str(tmp_path), "--guidance_panel", "2", "--per_digit", "1",
                    "--no_progress", "--device", "cpu"])
    assert (tmp_path / "guidance.png").stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["guidance.png", "short.pt"]  # only that picture
    with pytest.raises(UserError, match="--guidance_panel must be"):
        make_pics.main(["--checkpoint", ckpt, "--out_dir", str(tmp_path), "--guidance_panel", "1,-2"])
    uncond = str(tmp_path / "u.pt")
    m = UNet(**TINY)
    torch.save({"model_args": m.model_args, "diffusion_args": GaussianDiffusion().args, "model": m.state_dict(),
                "step": 1, "total_steps": 1}, uncond)
    with pytest.raises(UserError, match="is unconditional"):
        make_pics.main(["--checkpoint", uncond, "--out_dir", str(tmp_path), "--guidance_panel", "1", "--device", "cpu"])
