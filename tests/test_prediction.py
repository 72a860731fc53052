"""v-prediction (Salimans & Ho 2022, appendix D): GaussianDiffusion(prediction="v") trains the network on
v = sqrt(ab_t) eps - sqrt(1 - ab_t) x_0, and diffusion.eps_theta turns its output into eps for everything that
samples or scores. Checked against closed forms written out here: the exact v of known x_0 gives back x_0 and
eps, the optimal v-predictor of Gaussian data samples as the optimal eps-predictor does (guidance and epsilon
scaling included), its loss is zero, and Min-SNR's weight for v is min(SNR, gamma) / (SNR + 1)."""
import math

import numpy as np
import pytest
import torch

import checkpoint
import evaluate
import run
from conftest import (
    MU,
    TINY_FLAGS,
    ConstEps,
    GaussianEps,
    GaussianV,
    S,
    expect_user_error,
    gaussian_samples,
    write_tiny_mnist,
)
from diffusion import GaussianDiffusion
from sample import guided
from samplers import SAMPLERS, Denoiser

TS = (0, 10, 500, 990)  # low to high noise; the cosine schedule's t = 999 (ab = 2e-9) is the docstring's case


def known_x0(d, t, seed=0):
    """x_0 in [-1, 1], eps, x_t and the exact v (float64, from the schedule's alphabar) at timesteps t."""
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.rand(len(t), 1, 4, 4, generator=g) * 2 - 1, torch.randn(len(t), 1, 4, 4, generator=g)
    ab = d.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    xt = ab.sqrt() * x0.double() + (1 - ab).sqrt() * eps.double()
    return x0, eps, xt.float(), (ab.sqrt() * eps.double() - (1 - ab).sqrt() * x0.double()).float()


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_exact_v_gives_back_x0_and_eps(schedule):
    """The network that outputs the true v of a known x_0: eps_theta is the noise, predict_x0 (and the samplers'
    Denoiser) x_0 itself; the training loss on v is zero, and v itself is the target (the loss of a network
    that outputs 0 is the mean of v^2)."""
    d, t = GaussianDiffusion(schedule=schedule, prediction="v"), torch.tensor(TS)
    x0, eps, xt, v = known_x0(d, t)
    net = ConstEps(v)
    torch.testing.assert_close(d.eps_theta(net)(xt, t), eps, rtol=0, atol=1e-6)
    torch.testing.assert_close(d.predict_x0(d.eps_theta(net), xt, t, clip=False), x0, rtol=0, atol=1e-4)
    for i, ti in enumerate(TS):
        torch.testing.assert_close(Denoiser(ConstEps(v[i:i + 1]), d)(xt[i:i + 1], ti), x0[i:i + 1], rtol=0, atol=1e-4)
    assert d.training_losses(net, x0, t=t, noise=eps).max() < 1e-12
    torch.testing.assert_close(d.training_losses(ConstEps(torch.zeros(1)), x0, t=t, noise=eps),
                               v.pow(2).mean(dim=(1, 2, 3)))
    assert GaussianDiffusion(schedule=schedule).eps_theta(net) is net  # eps-prediction: the network itself


def test_min_snr_weights_for_v():
    """Hang et al. 2023 (section 3.4): with v-prediction the Min-SNR-gamma weight is min(SNR, gamma) / (SNR + 1),
    which makes the weighted v loss the x_0 loss times min(SNR, gamma), as for eps-prediction."""
    d, t, gamma = GaussianDiffusion(prediction="v"), torch.tensor([0, 10, 100, 300, 999]), 5.0
    ab = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t.numpy()]
    snr = ab / (1 - ab)
    w = d.loss_weights(t, "min_snr", gamma)
    np.testing.assert_allclose(w.numpy(), np.minimum(snr, gamma) / (snr + 1), rtol=1e-6)
    assert w[0] < 1e-3 and w[-1] < 1e-4 and d.loss_weights(t, "none") is None  # both ends small, unlike eps's
    x0, eps, xt, v = known_x0(d, t)
    model = lambda x, t: 0.5 * x  # noqa: E731 - any network
    plain = d.training_losses(model, x0, t=t, noise=eps)
    weighted = d.training_losses(model, x0, t=t, noise=eps, weight="min_snr", gamma=gamma)
    torch.testing.assert_close(weighted, plain * w)
    x0_loss = (d.predict_x0(d.eps_theta(model), xt, t, clip=False) - x0).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(weighted, x0_loss * torch.tensor(np.minimum(snr, gamma)).float(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_samplers_draw_gaussian_data_from_the_optimal_v(schedule):
    """Every sampler of the registry on the optimal v-predictor draws what it draws on the optimal eps-predictor,
    from the same noise (the two networks imply the same eps up to float32 rounding)."""
    dv, de = GaussianDiffusion(schedule=schedule, prediction="v"), GaussianDiffusion(schedule=schedule)
    for name in SAMPLERS:
        a, b = (gaussian_samples(d, name, 10, n=200, spacing="logsnr" if SAMPLERS[name].spacing else None)
                for d in (dv, de))
        assert (a - b).abs().max() < 1e-4, (name, (a - b).abs().max())


@pytest.mark.parametrize("sampler, steps, tol", [("ddpm", None, 0.01), ("dpm++2m", 20, 0.01),
                                                 ("dpm++2m-sde", 50, 0.01)])
def test_samples_of_gaussian_data_with_v_have_its_mean_and_variance(sampler, steps, tol):
    """The tolerances of test_samplers' Gaussian-data test, under the cosine schedule v-prediction is used with."""
    x = gaussian_samples(GaussianDiffusion(schedule="cosine", prediction="v"), sampler, steps)
    assert abs(x.mean().item() - MU) < tol and abs(x.std().item() - S) < tol, (x.mean(), x.std())


def test_eps_scale_acts_on_the_eps_that_v_implies():
    """Epsilon scaling divides eps, not v: the Denoiser's eps_theta of a v-network with eps_scale c is the
    eps-network's divided by c, and the samples widen as on the eps-network (0.2045 against 0.2005)."""
    dv, de = GaussianDiffusion(prediction="v"), GaussianDiffusion()
    x, t = torch.randn(3, 1, 2, 2), torch.tensor([5, 400, 999])
    torch.testing.assert_close(Denoiser(GaussianV(dv), dv, eps_scale=1.25).eps_fn(x, t), GaussianEps(de)(x, t) / 1.25,
                               rtol=0, atol=1e-6)
    wide = gaussian_samples(dv, "dpm++2m-sde", 50, eps_scale=1.02)
    torch.testing.assert_close(wide, gaussian_samples(de, "dpm++2m-sde", 50, eps_scale=1.02), rtol=0, atol=1e-4)
    assert wide.std().item() > gaussian_samples(dv, "dpm++2m-sde", 50).std().item() + 0.002


def test_guidance_on_v_is_guidance_on_the_eps_it_implies():
    """Classifier-free guidance (sample.guided) combines the two v outputs; converted to eps that is
    (1 + w) eps(x, y) - w eps(x, null) of the eps's the two v's imply."""
    d, w, null = GaussianDiffusion(prediction="v"), 2.0, 10
    g = torch.Generator().manual_seed(0)
    v_cond, v_null = torch.randn(2, 1, 4, 4, generator=g), torch.randn(2, 1, 4, 4, generator=g)

    def net(x, t, y):
        return torch.where((y == null).reshape(-1, 1, 1, 1), v_null.repeat(2, 1, 1, 1), v_cond.repeat(2, 1, 1, 1))
    x, t = torch.randn(2, 1, 4, 4, generator=g), torch.tensor([100, 900])
    def eps_of(v):  # the eps a constant v implies at x, t
        return d.eps_theta(lambda x_, t_: v)(x, t)
    want = (1 + w) * eps_of(v_cond) - w * eps_of(v_null)
    got = Denoiser(guided(net, torch.tensor([3, 7]), w, null), d).eps_fn(x, t)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_variational_bound_terms_with_a_v_oracle():
    """The bound (vb_term_bpd, as metrics.nll_bpd calls it with the network itself) of a network that outputs
    the true v: its KL terms are the variances' alone, as for the eps oracle (tests/test_recipe.py)."""
    x0 = torch.rand(3, 1, 4, 4) * 2 - 1
    d = GaussianDiffusion(schedule="cosine", var_type="fixed_small", prediction="v")

    def oracle(xt, t):
        ab = d.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
        return (ab.sqrt() * xt - x0) / (1 - ab).sqrt()  # v = (sqrt(ab) x_t - x_0) / sqrt(1 - ab)
    for t in (1, 10, 500, 998):
        got = d.vb_term_bpd(oracle, x0, torch.full((3,), t), torch.randn_like(x0), clip_denoised=False)
        assert got.abs().max() < 2e-4, (t, got)


def test_prediction_is_checked_and_old_checkpoints_are_eps():
    with pytest.raises(ValueError, match="prediction must be eps or v"):
        GaussianDiffusion(prediction="x0")
    assert GaussianDiffusion().args["prediction"] == "eps"
    assert GaussianDiffusion(prediction="v").args["prediction"] == "v"
    old = {k: v for k, v in GaussianDiffusion().args.items() if k != "prediction"}  # written before the flag
    assert GaussianDiffusion(**old).prediction == "eps"


def test_run_with_prediction_v_trains_samples_and_resumes_only_as_v(tmp_path, capsys, monkeypatch):
    """A tiny run.py training with --prediction v (in-process, as `python run.py`) stores it in the checkpoint,
    evaluate.py samples from that alone, and --resume refuses another --prediction (an old checkpoint: eps)."""
    monkeypatch.chdir(tmp_path)
    write_tiny_mnist(str(tmp_path / "data"))
    train = [*TINY_FLAGS, "--device", "cpu", "--batch_size", "16", "--max_steps", "3", "--save_every", "3",
             "--n_samples", "1", "--sampler", "ddim", "--sampling_steps", "2", "--no_progress", "--data_dir", "data",
             "--schedule", "cosine", "--loss_weight", "min_snr"]
    run.main([*train, "--prediction", "v", "--checkpoint", "v.pt"])
    ckpt = checkpoint.load(tmp_path / "v.pt")
    assert ckpt["diffusion_args"]["prediction"] == "v" and all(math.isfinite(x) for x in ckpt["loss_history"])
    assert checkpoint.build_model(ckpt)[1].prediction == "v"
    evaluate.main(["--checkpoint", "v.pt", "--n_samples", "2", "--sampler", "dpm++2m", "--sampling_steps", "3",
                   "--eps_scale", "1.01", "--save_samples", "s.npz", "--out", "s.jpg", "--no_progress"])
    assert np.load(tmp_path / "s.npz")["samples"].shape == (2, 28, 28)
    capsys.readouterr()
    expect_user_error(capsys, run.main, ["--resume", "--checkpoint", "v.pt", "--prediction", "eps"],
                      "--prediction eps but the checkpoint has v")
    del ckpt["diffusion_args"]["prediction"]  # a checkpoint written before --prediction existed
    checkpoint.save(tmp_path / "old.pt", ckpt)
    expect_user_error(capsys, run.main, ["--resume", "--checkpoint", "old.pt", "--prediction", "v"],
                      "--prediction v but the checkpoint has eps")
    expect_user_error(capsys, run.main, ["--prediction", "x0", "--dry_run"], "invalid choice: 'x0'")
