"""The schedule, forward process and posterior against closed forms computed independently (numpy)."""
import numpy as np
import pytest
import torch

from conftest import ConstEps
from diffusion import GaussianDiffusion, from_model_range, to_model_range, to_uint8

T = 1000


@pytest.fixture(scope="module")
def diff():
    return GaussianDiffusion()


def np_schedule():
    betas = np.linspace(1e-4, 0.02, T, dtype=np.float64)
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    return betas, abar, abar_prev


def test_linear_schedule_closed_form(diff):
    betas, abar, abar_prev = np_schedule()
    assert diff.betas.dtype == torch.float64
    np.testing.assert_allclose(diff.betas.numpy(), betas, rtol=0, atol=1e-15)
    np.testing.assert_allclose(diff.alphas_cumprod.numpy(), abar, rtol=1e-12)
    assert diff.betas[0].item() == pytest.approx(1e-4) and diff.betas[-1].item() == pytest.approx(0.02)
    # alphabar_T is essentially 0: x_T is (almost) pure noise, as the paper requires.
    assert diff.alphas_cumprod[-1].item() < 1e-4


def test_q_mean_variance_closed_form(diff):
    _, abar, _ = np_schedule()
    x0 = torch.randn(4, 1, 28, 28)
    t = torch.tensor([0, 10, 500, 999])
    mean, var = diff.q_mean_variance(x0, t)
    for i, ti in enumerate(t.tolist()):
        np.testing.assert_allclose(mean[i].numpy(), np.sqrt(abar[ti]) * x0[i].numpy(), rtol=1e-5, atol=1e-6)
        assert var[i].item() == pytest.approx(1 - abar[ti], rel=1e-5)


def test_q_sample_matches_its_distribution(diff):
    """Empirical mean and variance of q_sample over many noise draws (eq. 4)."""
    _, abar, _ = np_schedule()
    n, x0_val = 200_000, 0.7
    for ti in (0, 100, 999):
        x0 = torch.full((n, 1, 1, 1), x0_val)
        t = torch.full((n,), ti)
        xt = diff.q_sample(x0, t, torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(ti)))
        assert xt.mean().item() == pytest.approx(np.sqrt(abar[ti]) * x0_val, abs=5e-3)
        assert xt.var().item() == pytest.approx(1 - abar[ti], rel=2e-2, abs=1e-5)


def test_posterior_coefficients_eq7(diff):
    betas, abar, abar_prev = np_schedule()
    coef1 = np.sqrt(abar_prev) * betas / (1 - abar)
    coef2 = np.sqrt(1 - betas) * (1 - abar_prev) / (1 - abar)
    beta_tilde = (1 - abar_prev) / (1 - abar) * betas
    np.testing.assert_allclose(diff.posterior_mean_coef1.numpy(), coef1, rtol=1e-12)
    np.testing.assert_allclose(diff.posterior_mean_coef2.numpy(), coef2, rtol=1e-12)
    np.testing.assert_allclose(diff.posterior_variance.numpy(), beta_tilde, rtol=1e-12, atol=1e-300)


def test_posterior_is_bayes_rule(diff):
    """q(x_{t-1}|x_t,x_0) from the product of the Gaussians q(x_t|x_{t-1}) q(x_{t-1}|x_0):
    precision = alpha_t/beta_t + 1/(1-abar_{t-1});
    mean = var * (sqrt(alpha_t) x_t/beta_t + sqrt(abar_{t-1}) x_0/(1-abar_{t-1}))."""
    betas, abar, abar_prev = np_schedule()
    x0, xt = torch.tensor([[[[0.3]]]]), torch.tensor([[[[-1.2]]]])
    for ti in (1, 50, 999):
        var = 1.0 / ((1 - betas[ti]) / betas[ti] + 1.0 / (1 - abar_prev[ti]))
        mean = var * (np.sqrt(1 - betas[ti]) * -1.2 / betas[ti] + np.sqrt(abar_prev[ti]) * 0.3 / (1 - abar_prev[ti]))
        m, v = diff.q_posterior_mean_variance(x0, xt, torch.tensor([ti]))
        assert m.item() == pytest.approx(mean, rel=1e-5)
        assert v.item() == pytest.approx(var, rel=1e-5)


def test_p_sample_is_eq_11_without_clipping(diff):
    """Algorithm 2's step as computed (the posterior mean at the predicted x_0) is eq. 11's
    1/sqrt(alpha_t) (x_t - beta_t/sqrt(1-abar_t) eps) as the paper writes it (p_mean_eq11, and numpy)
    plus sigma_t z with sigma_t^2 = beta_t (fixed_large)."""
    betas, abar, _ = np_schedule()
    g = torch.Generator().manual_seed(0)
    xt, eps, z = (torch.randn(3, 1, 28, 28, generator=g) for _ in range(3))
    t = torch.tensor([1, 400, 999])
    step = diff.p_sample(ConstEps(eps), xt, t, z, clip=False)
    eq11 = diff.p_mean_eq11(eps, xt, t)
    for i, ti in enumerate(t.tolist()):
        expect = (xt[i] - betas[ti] / np.sqrt(1 - abar[ti]) * eps[i]) / np.sqrt(1 - betas[ti])
        np.testing.assert_allclose(eq11[i].numpy(), expect.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose((step[i] - np.sqrt(betas[ti]) * z[i]).numpy(), expect.numpy(), rtol=1e-4, atol=1e-5)
    # with clipping the two differ exactly where the predicted x_0 leaves [-1, 1]
    clipped = diff.p_sample(ConstEps(eps * 50), xt, t, z) - diff.p_sample(ConstEps(eps * 50), xt, t, z, clip=False)
    assert clipped.abs().max() > 0.1


def test_fixed_small_variance_is_beta_tilde():
    d = GaussianDiffusion(var_type="fixed_small")
    x, z, t = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2), torch.tensor([500])
    step = d.p_sample(ConstEps(torch.zeros(1)), x, t, z)  # x = 0, eps = 0: the mean is 0, the rest sigma_t z
    assert step.flatten()[0].item() == pytest.approx(d.posterior_variance[500].sqrt().item(), rel=1e-6)
    with pytest.raises(ValueError):
        GaussianDiffusion(var_type="learned")


def test_last_step_adds_no_noise(diff):
    x = torch.randn(2, 1, 4, 4)
    model = ConstEps(torch.zeros(1))
    assert torch.equal(diff.p_sample(model, x, torch.tensor([0, 0]), torch.randn(2, 1, 4, 4)),
                       diff.p_sample(model, x, torch.tensor([0, 0]), torch.randn(2, 1, 4, 4)))


def test_training_draws_t_over_the_whole_range(diff):
    seen = []

    class Rec(torch.nn.Module):
        def forward(self, x, t):
            seen.append(t)
            return torch.zeros_like(x)

    for _ in range(20):
        diff.training_losses(Rec(), torch.zeros(500, 1, 2, 2), torch.Generator().manual_seed(len(seen)))
    t = torch.cat(seen)
    assert t.min().item() == 0 and t.max().item() == T - 1  # paper's t = 1..T, 0-indexed


def test_scaling_round_trip():
    u = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    x = to_model_range(u.float() / 255)
    assert x.min().item() == -1 and x.max().item() == 1
    assert torch.equal(to_uint8(x), u[:, 0])
    assert torch.allclose(from_model_range(x), u.float() / 255)
