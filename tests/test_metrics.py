"""Feature-FID, precision/recall and the bits/dim bound, on small data made here."""
import math

import pytest
import torch

from conftest import TINY, fake_digits
from diffusion import GaussianDiffusion, discretized_gaussian_log_likelihood
from metrics import MNISTClassifier, feature_stats, features, fid_from_stats, nll_bpd, precision_recall
from model import UNet


@pytest.fixture(scope="module")
def feats():
    torch.manual_seed(0)
    clf = MNISTClassifier().eval()  # random weights are enough to tell strokes from noise
    a = torch.from_numpy(fake_digits(400, seed=1)[0])
    b = torch.from_numpy(fake_digits(400, seed=2)[0])
    noise = torch.randint(0, 256, (400, 28, 28), dtype=torch.uint8)
    return features(clf, a), features(clf, b), features(clf, noise)


def fid(a, b):
    return fid_from_stats(feature_stats(a), feature_stats(b))


def test_fid_of_a_set_with_itself_is_zero(feats):
    a, _, _ = feats
    assert abs(fid(a, a)) < 1e-3


def test_fid_real_vs_real_far_below_noise_vs_real(feats):
    a, b, noise = feats
    assert fid(a, b) < 0.1 * fid(noise, b)


def test_precision_recall(feats):
    a, b, noise = feats
    p, r = precision_recall(a, b)
    assert p > 0.8 and r > 0.8
    p_noise, _ = precision_recall(a, noise)
    assert p_noise < 0.1


def test_decoder_probabilities_sum_to_one():
    x = (torch.arange(256, dtype=torch.float64) * 2 / 255 - 1)[:, None]  # the 256 pixel values
    for mean, log_scale in ((0.0, -3.0), (0.93, -5.0), (-1.2, 0.0), (0.3, -6.5)):
        logp = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, log_scale))
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_bpd_terms_sum_and_training_lowers_it():
    torch.manual_seed(0)
    d = GaussianDiffusion()
    model = UNet(**TINY)
    images = torch.from_numpy(fake_digits(8, seed=3)[0])
    before = nll_bpd(model, d, images, n_timesteps=20, batch_size=8, progress=False)
    assert math.isfinite(before["bpd"]) and before["bpd"] > 0
    assert before["bpd"] == pytest.approx(before["prior"] + before["decoder"] + before["terms"], rel=1e-9)
    assert sum(before["breakdown"].values()) == pytest.approx(before["terms"], rel=1e-9)
    assert before["prior"] < 1e-4  # alphabar_T ~ 4e-5: x_T is almost exactly N(0, I)

    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    x0 = images.float().div(255).mul(2).sub(1).unsqueeze(1)
    for _ in range(15):  # 5.3 -> 4.4 bits/dim (3.3 after 30 steps)
        loss = d.training_losses(model, x0).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = nll_bpd(model, d, images, n_timesteps=20, batch_size=8, progress=False)
    assert after["bpd"] < before["bpd"]


def test_decoder_term_is_finite_for_both_variances():
    """sigma^2 at t = 0 is beta-tilde_1 for both choices (beta-tilde_0 = 0 would make L_0 a point mass)."""
    x0 = torch.from_numpy(fake_digits(4, seed=5)[0]).float().div(255).mul(2).sub(1).unsqueeze(1)
    for var_type in ("fixed_large", "fixed_small"):
        d = GaussianDiffusion(var_type=var_type)
        l0 = d.vb_term_bpd(lambda x, t: torch.zeros_like(x), x0, torch.zeros(4, dtype=torch.long), torch.randn_like(x0))
        assert torch.isfinite(l0).all() and (l0 < 20).all(), (var_type, l0)


def test_stratified_estimate_matches_exact_sum():
    """With few timesteps the estimate is unbiased: compare to the exact sum on a cheap model."""
    class Zero(torch.nn.Module):  # eps = 0: cheap, and every term is well defined
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, t):
            return torch.zeros_like(x)

    d, images = GaussianDiffusion(), torch.from_numpy(fake_digits(8, seed=4)[0])
    exact = nll_bpd(Zero(), d, images, n_timesteps=None, batch_size=8, progress=False)
    assert exact["exact_sum"] and exact["n_timesteps"] == 999
    est = [nll_bpd(Zero(), d, images, n_timesteps=200, batch_size=8, seed=s, progress=False) for s in range(8)]
    mean = sum(e["bpd"] for e in est) / len(est)
    assert mean == pytest.approx(exact["bpd"], rel=0.05)
