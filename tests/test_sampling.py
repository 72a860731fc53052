"""sample_func: shapes, the reverse-process steps, per-sample seeds, batch-size independence; timestep grids."""
import pytest
import torch

from conftest import TINY, slow, undo_zero_init
from diffusion import GaussianDiffusion
from model import UNet
from sample import sample_func, sampler_kwargs
from samplers import SAMPLERS, SPACINGS, log_snr, sample_seed, timesteps


def test_timestep_spacings():
    d = GaussianDiffusion()
    lam = log_snr(d)

    def grid(S, spacing="uniform"):  # increasing, without the final -1 (x_0)
        return torch.tensor(timesteps(d, S, spacing)[-2::-1])
    for spacing in SPACINGS:
        for S in (10, 50, 100, 900, 1000):  # every spacing gives S distinct timesteps from 0 to T-1
            ts = grid(S, spacing)
            assert ts[0] == 0 and ts[-1] == 999 and len(ts) == S and (ts.diff() > 0).all(), (spacing, S)
        assert torch.equal(grid(1000, spacing), torch.arange(1000))
        assert timesteps(d, 1, spacing) == [999, -1]  # one step starts from x_T
    assert grid(10).tolist() == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert grid(5, "quadratic").tolist() == [0, 62, 250, 562, 999]  # (i/4)^2 * 999, rounded
    steps = lam[grid(8, "logsnr")].diff()  # even in log-SNR, up to rounding to a timestep
    assert (steps.max() - steps.min()).abs() < 0.05 * steps.abs().mean()
    q = grid(10, "karras")
    assert q[1] - q[0] < q[-1] - q[-2]  # denser near t = 0
    with pytest.raises(ValueError):
        timesteps(d, 0)
    with pytest.raises(ValueError, match="spacing must be one of"):
        timesteps(d, 10, "cosine")


@pytest.mark.parametrize("kw", [{}, {"sampler": "ddim", "sampling_steps": 10, "eta": 0.5, "spacing": "quadratic"}])
def test_sample_func_shapes_steps_and_seed(kw):
    torch.manual_seed(0)
    model = undo_zero_init(UNet(**TINY))  # non-zero output so the samples depend on the network
    d = GaussianDiffusion(T=40)  # a short chain keeps the test fast; the loop is the same for any T
    s, steps = sample_func(model, 5, d, seed=1, batch_size=2, return_steps=(40, 20, 0), progress=False, **kw)
    assert s.shape == (5, 1, 28, 28) and s.min() >= -1 - 1e-6 and s.max() <= 1 + 1e-6
    assert set(steps) == {40, 20, 0} and steps[20].shape == (5, 1, 28, 28)
    assert torch.equal(steps[0], s)
    s2, _ = sample_func(model, 3, d, seed=1, batch_size=2, progress=False, **kw)
    assert torch.equal(s[:2], s2[:2])  # sample i depends on (seed, i), whatever n_samples is
    s3, _ = sample_func(model, 2, d, seed=2, batch_size=2, progress=False, **kw)
    assert not torch.equal(s[:2], s3)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_samples_do_not_depend_on_the_batch_size(sampler):
    """Sample i depends only on (seed, i): batch sizes 5, 2 and 1, and a run of 3 samples, give the
    same digits up to the floating-point differences of batched kernels: tolerance 1e-4 in [-1, 1]
    (measured: at most 1.1e-6 on this CPU), far below one pixel level (2/255 = 8e-3)."""
    torch.manual_seed(0)
    model = undo_zero_init(UNet(**TINY))
    d = GaussianDiffusion(T=20)  # a short chain: the same loop, faster
    kw = dict(sampler=sampler, progress=False, sampling_steps=None if sampler == "ddpm" else 10)
    if sampler == "ddim":
        kw["eta"] = 1.0  # noise at every step, as the stochastic samplers
    ref, _ = sample_func(model, 5, d, seed=3, batch_size=5, **kw)
    for bs in (2, 1):
        torch.testing.assert_close(sample_func(model, 5, d, seed=3, batch_size=bs, **kw)[0], ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(sample_func(model, 3, d, seed=3, batch_size=3, **kw)[0], ref[:3], rtol=0, atol=1e-4)
    other, _ = sample_func(model, 5, d, seed=4, batch_size=5, **kw)
    assert (other - ref).abs().amax(dim=(1, 2, 3)).min() > 0.1  # another seed, other digits


def test_sample_seeds_are_distinct():
    seeds = {sample_seed(s, i) for s in range(20) for i in range(500)}
    assert len(seeds) == 20 * 500 and sample_seed(0, 7) == sample_seed(0, 7)
    assert sample_seed(-1, 0) == sample_seed(2 ** 64 - 1, 0)


@slow  # inductor's cold compile: 35 s on 2 cores
def test_compiled_forward_matches_eager():
    """torch.compile (inductor) gives the same network output as eager, to float32 tolerance."""
    torch.manual_seed(0)
    model = undo_zero_init(UNet(**TINY)).eval()
    x, t = torch.randn(4, 1, 28, 28), torch.tensor([0, 10, 500, 999])
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x, t), model(x, t), rtol=1e-4, atol=1e-4)


def test_amp_refusals():
    from utils import UserError, check_amp
    cpu = torch.device("cpu")
    check_amp(cpu, "none")
    check_amp(cpu, "bf16")  # runs on CPUs (slower than fp32 here; see README)
    with pytest.raises(UserError, match="needs CUDA"):
        check_amp(cpu, "fp16")
    with pytest.raises(UserError, match="MPS"):
        check_amp(torch.device("mps"), "bf16")


@pytest.mark.parametrize("sampler", ["ddpm", "edm"])
def test_eps_scale_changes_the_digits_and_1_changes_nothing(sampler):
    """Epsilon scaling applies to every sampler, ddpm's p_sample included (it wraps the network); eps_scale 1
    is no wrap at all: bitwise the digits without it."""
    torch.manual_seed(0)
    model = undo_zero_init(UNet(**TINY))
    d = GaussianDiffusion(T=20)
    kw = dict(sampler=sampler, progress=False, sampling_steps=None if sampler == "ddpm" else 5, seed=1)
    ref, _ = sample_func(model, 3, d, **kw)
    assert torch.equal(sample_func(model, 3, d, eps_scale=1.0, **kw)[0], ref)
    assert not torch.equal(sample_func(model, 3, d, eps_scale=1.05, **kw)[0], ref)


def test_the_repos_sampler_settings_are_the_flags_as_flags_gives():
    """samplers.RECOMMENDED and EVAL_SAMPLER, sample_func's keyword arguments, and their flags (as_flags) are one
    setting: the flags parse back to the setting itself (with the sampler's own spacing filled in)."""
    import evaluate
    import samplers

    for setting in (samplers.RECOMMENDED, samplers.EVAL_SAMPLER):
        args = evaluate.get_parser().parse_args(samplers.as_flags(setting))
        assert sampler_kwargs(args, GaussianDiffusion()) == {"spacing": SAMPLERS[setting["sampler"]].spacing, **setting}
    assert samplers.as_flags(samplers.RECOMMENDED) == ["--sampler", "dpm++2m-sde", "--sampling_steps", "50"]


def test_sampler_kwargs_take_eps_scale_for_every_sampler():
    import evaluate
    from utils import UserError

    def skw(*argv):
        return sampler_kwargs(evaluate.get_parser().parse_args(list(argv)), GaussianDiffusion())
    assert skw("--eps_scale", "1.005") == {"sampler": "ddpm", "eps_scale": 1.005}
    assert skw("--eps_scale", "1") == {"sampler": "ddpm"}  # off: recorded as before
    assert skw("--sampler", "edm", "--eps_scale", "1.003", "--churn", "5") == {
        "sampler": "edm", "sampling_steps": 50, "spacing": "karras", "churn": 5.0, "s_tmin": 0.01, "s_tmax": 1.0,
        "s_noise": 1.007, "eps_scale": 1.003}
    assert skw("--sampler", "ddpm-respaced", "--variance", "beta_tilde")["variance"] == "beta_tilde"
    with pytest.raises(UserError, match="--eps_scale must be > 0"):
        skw("--eps_scale", "0")
    with pytest.raises(UserError, match="--churn is for --sampler edm; ddim has none"):
        skw("--sampler", "ddim", "--churn", "1")
