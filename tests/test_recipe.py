"""The training-recipe options: the cosine schedule, Min-SNR-gamma weighting, and
--eval_every, which must not change what is trained."""
import math
import os

import pytest
import torch

import checkpoint
from conftest import MU, TINY_FLAGS, S, expect_user_error, gaussian_samples, same_weights, write_tiny_mnist
from diffusion import GaussianDiffusion
from samplers import LAMBDA_MIN, log_snr, timesteps


def test_cosine_schedule_is_nichol_and_dhariwal_eq_17():
    d = GaussianDiffusion(schedule="cosine")
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 1, 250, 500, 900):  # 0-indexed t is their t + 1
        assert float(d.alphas_cumprod[t]) == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert float(d.betas.max()) == 0.999 and (d.betas[1:] >= d.betas[:-1]).all()
    assert d.args["schedule"] == "cosine" and GaussianDiffusion().args["schedule"] == "linear"
    with pytest.raises(ValueError, match="schedule must be"):
        GaussianDiffusion(schedule="sigmoid")


def test_log_snr_spacings_skip_the_cosine_schedules_empty_end():
    """Only the first step lies below LAMBDA_MIN; the linear schedule never reaches it (unchanged)."""
    for schedule in ("linear", "cosine"):
        d = GaussianDiffusion(schedule=schedule)
        lam = log_snr(d)
        for spacing in ("logsnr", "karras"):
            ts = timesteps(d, 20, spacing)[:-1]  # from T-1 down to 0
            assert ts[0] == 999 and (lam[ts[1:]] >= LAMBDA_MIN - 0.05).all(), (schedule, spacing)
    assert log_snr(GaussianDiffusion())[-1] > LAMBDA_MIN


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_variational_bound_terms_with_an_oracle(schedule):
    """A network that knows x_0 predicts the true eps, so p_theta's mean is the posterior's: every
    term L_t (t >= 1) is then the KL of the variances alone, 0 for sigma^2 = beta-tilde and
    0.5 (r - 1 - log r) nats per dimension, r = beta-tilde / beta, for sigma^2 = beta."""
    x0 = torch.rand(3, 1, 4, 4) * 2 - 1
    for var_type in ("fixed_small", "fixed_large"):
        d = GaussianDiffusion(schedule=schedule, var_type=var_type)

        def oracle(xt, t, d=d):
            ab = d.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
            return (xt - ab.sqrt() * x0) / (1 - ab).sqrt()
        for t in (1, 10, 500, 998):
            tt = torch.full((3,), t)
            got = d.vb_term_bpd(oracle, x0, tt, torch.randn_like(x0), clip_denoised=False)
            r = float(d.posterior_variance[t] / d.model_variance[t])
            want = 0.5 * (r - 1 - math.log(r)) / math.log(2)
            assert torch.allclose(got, torch.full_like(got, want), atol=2e-4), (var_type, t, got, want)


def test_min_snr_weights():
    d = GaussianDiffusion()
    t = torch.tensor([0, 10, 100, 300, 999])
    snr = d.alphas_cumprod[t] / (1 - d.alphas_cumprod[t])
    w = d.loss_weights(t, "min_snr", 5.0)
    torch.testing.assert_close(w, (snr.clamp(max=5.0) / snr).float())
    assert w[0] < 1e-3 and w[-1] == 1 and d.loss_weights(t, "none") is None
    x0, noise = torch.rand(5, 1, 4, 4) * 2 - 1, torch.randn(5, 1, 4, 4)
    model = lambda x, t: 0.5 * x  # noqa: E731
    plain = d.training_losses(model, x0, t=t, noise=noise)
    torch.testing.assert_close(d.training_losses(model, x0, t=t, noise=noise, weight="min_snr", gamma=5.0), plain * w)
    with pytest.raises(ValueError, match="loss weight must be"):
        d.loss_weights(t, "p2")


@pytest.mark.parametrize("sampler, steps, tol", [("ddpm", None, 0.01), ("dpm++2m-sde", 50, 0.01),
                                                 ("restart", 20, 0.01), ("ddim", 100, 0.01)])
def test_samplers_on_gaussian_data_under_the_cosine_schedule(sampler, steps, tol):
    x = gaussian_samples(GaussianDiffusion(schedule="cosine"), sampler, steps, spacing="logsnr" if steps else None)
    assert abs(x.mean().item() - MU) < tol and abs(x.std().item() - S) < tol, (x.mean(), x.std())


TRAIN = [*TINY_FLAGS, "--device", "cpu", "--batch_size", "16", "--max_steps", "8", "--save_every", "4",
         "--n_samples", "1", "--sampler", "ddim", "--sampling_steps", "2", "--no_progress", "--data_dir", "data",
         "--loss_weight", "min_snr", "--schedule", "cosine"]


def test_eval_every_trains_bitwise_the_same_and_its_curve_survives_resume(tmp_path, capsys, monkeypatch):
    """In-process run.main (the same code as `python run.py`, without a process start-up each)."""
    import run
    monkeypatch.chdir(tmp_path)
    write_tiny_mnist(str(tmp_path / "data"))
    run.main([*TRAIN, "--checkpoint", "plain.pt"])
    run.main([*TRAIN, "--checkpoint", "eval.pt", "--eval_every", "3", "--eval_samples", "12", "--max_steps", "5"])
    out = capsys.readouterr().out
    assert "eval at step 3: feature-FID" in out and "evaluations (--eval_every)" in out
    run.main([*TRAIN, "--checkpoint", "eval.pt", "--resume", "--eval_every", "3", "--eval_samples", "12"])
    plain, ev = checkpoint.load(tmp_path / "plain.pt"), checkpoint.load(tmp_path / "eval.pt")
    same_weights(plain, ev)
    assert torch.equal(plain["loss_history"], ev["loss_history"])
    assert [e["step"] for e in ev["eval_history"]] == [3, 5, 6, 8]  # every 3 steps and at each run's end
    assert all(math.isfinite(e["fid"]) and 0 <= e["confidence"] <= 1 and e["seconds"] > 0 for e in ev["eval_history"])
    assert ev["diffusion_args"]["schedule"] == "cosine" and ev["train_config"]["loss_weight"] == "min_snr"
    assert "eval_history" not in plain or plain["eval_history"] == []
    assert checkpoint.export(ev)["eval_history"] == ev["eval_history"]
    assert os.path.getsize(tmp_path / "train_loss.png") > 0


def test_presets_schedules():
    """The paper preset keeps the DDPM recipe; the cpu and reference presets adopted the cosine schedule,
    the winner of the trials at equal cost; Min-SNR stays off everywhere."""
    import config
    for preset, schedule in (("paper", "linear"), ("cpu", "cosine"), ("reference", "cosine")):
        _, diffusion_args, cfg = config.resolve(preset)
        assert diffusion_args["schedule"] == schedule and cfg.loss_weight == "none", preset
    assert config.resolve("cpu", schedule="linear")[1]["schedule"] == "linear"  # a flag still overrides it


@pytest.mark.parametrize("argv, match", [
    (["--snr_gamma", "3"], "--snr_gamma is for --loss_weight min_snr"),
    (["--loss_weight", "min_snr", "--snr_gamma", "0"], "--snr_gamma must be > 0"),
    (["--eval_every", "-1"], "--eval_every must be >= 0"),
    (["--eval_samples", "5"], "--eval_samples must be >= 10"),
    (["--schedule", "quadratic"], "invalid choice: 'quadratic'"),
])
def test_recipe_flag_errors(argv, match, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    import run
    expect_user_error(capsys, run.main, [*argv, "--dry_run", "--device", "cpu"], match)
