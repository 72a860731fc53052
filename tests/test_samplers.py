"""The few-step samplers pinned to the math: DPM-Solver++ of order 1 is DDIM, the first-order SDE step
is the ancestral step, and on Gaussian data (where the optimal noise predictor is known in closed
form) every sampler draws the right distribution and the deterministic ones converge at their order."""
import math

import pytest
import torch

from diffusion import GaussianDiffusion
from test_diffusion import ConstEps

MU, S = 0.3, 0.2  # the data: x_0 ~ N(MU, S^2) in every pixel


class GaussianEps:
    """The optimal eps-predictor for x_0 ~ N(MU, S^2): E[eps | x_t] = sigma (x_t - a MU) / (a^2 S^2 + sigma^2)."""

    def __init__(self, d):
        self.d = d

    def __call__(self, x, t):
        ab = self.d.alphas_cumprod.to(x.device)[t].reshape(-1, 1, 1, 1)
        a, sigma = ab.sqrt(), (1 - ab).sqrt()
        return (sigma * (x - a * MU) / (ab * S ** 2 + 1 - ab)).float()


def sample(d, sampler, steps, n=4000, seed=0, spacing=None):
    g = torch.Generator().manual_seed(seed)
    kw = dict(generator=g, progress=False, clip_denoised=False)
    shape, model = (n, 1, 2, 2), GaussianEps(d)
    if sampler == "ddpm":
        return d.p_sample_loop(model, shape, **kw)[0]
    if sampler == "ddim":
        return d.ddim_sample_loop(model, shape, steps, spacing=spacing or "uniform", **kw)[0]
    if sampler == "restart":
        return d.restart_sample_loop(model, shape, steps, spacing=spacing or "logsnr", **kw)[0]
    return d.dpmpp_sample_loop(model, shape, steps, spacing=spacing or "logsnr", sde=sampler.endswith("sde"), **kw)[0]


@pytest.mark.parametrize("clip", [False, True])
def test_dpmpp_first_step_is_ddim_with_eta_0(clip):
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(0)
    xt, eps = 1.5 * torch.randn(4, 1, 6, 6, generator=g), torch.randn(4, 1, 6, 6, generator=g)
    for t_cur, t_prev in ((999, 950), (500, 200), (37, 36), (3, -1)):
        t = torch.full((4,), t_cur)
        a = d.dpmpp_2m_step(ConstEps(eps), xt, t, t_prev, {}, clip)
        b = d.ddim_step(ConstEps(eps), xt, t, t_prev, None, clip, 0.0)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("clip", [False, True])
def test_first_order_sde_step_is_the_ancestral_step_with_beta_tilde(clip):
    """Lu et al. 2022: the first-order SDE-DPM-Solver++ step between consecutive timesteps is DDPM's
    ancestral step with sigma_t^2 = beta-tilde_t (--var_type fixed_small), noise draw included."""
    d = GaussianDiffusion(var_type="fixed_small")
    g = torch.Generator().manual_seed(1)
    xt, eps = 1.5 * torch.randn(4, 1, 6, 6, generator=g), torch.randn(4, 1, 6, 6, generator=g)
    for t_cur in (999, 500, 37, 1, 0):
        t = torch.full((4,), t_cur)
        a = d.dpmpp_2m_step(ConstEps(eps), xt, t, t_cur - 1, {}, clip, sde=True,
                            generator=torch.Generator().manual_seed(t_cur))
        b = d.p_sample(ConstEps(eps), xt, t, torch.Generator().manual_seed(t_cur), clip)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sampler, steps, spacing, tol", [
    ("ddpm", None, None, 0.01), ("ddim", 1000, "uniform", 0.01), ("ddim", 100, "logsnr", 0.01),
    ("dpm++2m", 10, "logsnr", 0.01), ("dpm++2m", 20, "logsnr", 0.01),
    ("dpm++2m-sde", 20, "logsnr", 0.015),  # its std runs 0.205-0.210 over seeds 0-3 at 20 steps
    ("dpm++2m-sde", 50, "logsnr", 0.01),
    ("restart", 10, "logsnr", 0.015),  # std 0.188: its restart is 2 steps over t = 88 -> 8
    ("restart", 20, "logsnr", 0.01)])
def test_samples_of_gaussian_data_have_its_mean_and_variance(sampler, steps, spacing, tol):
    """16,000 numbers per case: the standard errors of mean and std are 0.0016 and 0.0011; the
    tolerance also bounds the sampler's own bias at that number of steps."""
    x = sample(GaussianDiffusion(), sampler, steps, spacing=spacing)
    assert abs(x.mean().item() - MU) < tol, x.mean()
    assert abs(x.std().item() - S) < tol, x.std()


def test_few_step_ddim_narrows_the_distribution():
    """The bias the stochastic samplers avoid: DDIM (eta 0) at 20 evenly spaced steps draws Gaussian
    data with a std near 0.14 instead of 0.2 (first-order steps, large in log-SNR near t = 0)."""
    d = GaussianDiffusion()
    assert sample(d, "ddim", 20, spacing="uniform").std().item() < 0.16
    assert abs(sample(d, "dpm++2m-sde", 20).std().item() - S) < 0.015


@pytest.mark.parametrize("sampler, order", [("ddim", 1), ("dpm++2m", 2)])
def test_deterministic_samplers_converge_at_their_order(sampler, order):
    """Against the exact probability-flow solution, which for Gaussian data keeps the standardised
    value (x_t - a_t MU) / sqrt(a_t^2 S^2 + sigma_t^2); every sampler ends with the x_0 prediction
    at t = 0, a fixed linear map, so it changes no order. Doubling the steps divides the error
    by about 2^order."""
    d = GaussianDiffusion()
    ab = d.alphas_cumprod
    x_T = torch.randn(2000, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    z = (x_T - math.sqrt(ab[-1]) * MU) / math.sqrt(ab[-1] * S ** 2 + 1 - ab[-1])
    a0, var0 = math.sqrt(ab[0]), ab[0] * S ** 2 + 1 - ab[0]
    exact = MU + a0 * S ** 2 / var0 * (math.sqrt(var0) * z)  # E[x_0 | x at t = 0], x on the exact path
    errors = [(sample(d, sampler, steps, n=2000, spacing="logsnr") - exact).abs().mean().item()
              for steps in (20, 40, 80)]
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(r > 0.8 * 2 ** order for r in ratios), (errors, ratios)


def test_restart_plan():
    """Restart (Xu et al. 2023) in S network evaluations: the ODE path, and one jump from t_min back
    up to t_max, followed by n = floor(S / 5) steps down to t_min again."""
    d = GaussianDiffusion()
    for S in (10, 20, 50, 100, 1000):
        pairs = d.restart_pairs(S)
        down, jumps = [p for p in pairs if p[1] < p[0]], [p for p in pairs if p[1] > p[0]]
        assert len(down) == S and len(jumps) == 1, S  # one network evaluation per step down
        (t_min, t_max), n = jumps[0], S // 5
        assert 8 <= t_min <= 20 and t_max == max(88, t_min + n)
        assert all(a == b for (_, a), (b, _) in zip(pairs, pairs[1:]))  # a connected path
        i = pairs.index(jumps[0])
        assert pairs[i + n][1] == t_min and pairs[i + n + 1][0] == t_min
    assert len([p for p in d.restart_pairs(50, times=2) if p[1] > p[0]]) == 2
    assert d.restart_pairs(9) == d.descending(d.ddim_timesteps(9, "logsnr").tolist())  # no room: the ODE path
    assert d.restart_pairs(20, times=0) == d.descending(d.ddim_timesteps(20, "logsnr").tolist())


def test_restart_without_restarts_is_dpmpp_2m():
    d = GaussianDiffusion()
    a = d.restart_sample_loop(GaussianEps(d), (8, 1, 2, 2), 20, generator=torch.Generator().manual_seed(0),
                              progress=False, clip_denoised=False, times=0)[0]
    b = sample(d, "dpm++2m", 20, n=8)
    assert torch.equal(a, b)


def test_renoise_is_the_forward_process():
    """x_t drawn exactly from q(x_t) of Gaussian data, renoised to t_up, has the law of q(x_{t_up})."""
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(0)
    for t, t_up in ((14, 88), (0, 999), (300, 301)):
        ab, ab_up = float(d.alphas_cumprod[t]), float(d.alphas_cumprod[t_up])
        x0 = MU + S * torch.randn(40000, generator=g)
        x = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * torch.randn(40000, generator=g)
        y = d.renoise(x, t, t_up, g)
        assert abs(y.mean().item() - math.sqrt(ab_up) * MU) < 0.01
        assert abs(y.std().item() - math.sqrt(ab_up * S ** 2 + 1 - ab_up)) < 0.01
