"""Shared fixtures and helpers: tiny MNIST-format data written by the tests themselves, a tiny UNet,
running a script, expecting a one-line error, comparing weights. Test modules import only this one."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dataloader import RAW_FILES, _write_idx  # noqa: E402
from model import UNet  # noqa: E402
from utils import run_main  # noqa: E402

# One thread, in this process and in the processes the tests start (torch reads OMP_NUM_THREADS when it
# loads). The tests' networks are tiny: a second thread has little to share, and when the cores are busy with
# other work (the other test processes, CI neighbours) the threads wait on each other at every operation; on a
# loaded 2-core machine a step of the tiny UNet took 10 to 40 times as long on 2 threads as on 1. A test about
# the number of threads sets it itself (tests/test_judge.py).
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

# Tests that take half a minute of a 2-core machine each and guard what another test guards in part: run
# with DDPM_SLOW_TESTS=1 (as docs/gpu.md does on a GPU), skipped by bash .ci/run to keep it under 5 minutes.
slow = pytest.mark.skipif(os.environ.get("DDPM_SLOW_TESTS") != "1", reason="slow; run with DDPM_SLOW_TESTS=1")

# The smallest UNet that still has every part: 2 levels (28 -> 14), attention at 14 and in the middle.
TINY = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(14,), dropout=0.0)
TINY_FLAGS = ["--ch", "8", "--ch_mult", "1,2", "--num_res_blocks", "1", "--attn_res", "14", "--dropout", "0"]


def sh(args, cwd, check=True, **kw):
    p = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=240, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} exited {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return p


def expect_user_error(capsys, main, argv, match):
    with pytest.raises(SystemExit) as e:
        run_main(lambda: main(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
    assert "Traceback" not in err


def same_weights(a, b):
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}.{k} differs"


def fake_digits(n, seed):
    """Blurry strokes on black, uint8 (n, 28, 28), and labels; MNIST-shaped, not MNIST."""
    g = np.random.default_rng(seed)
    x = np.zeros((n, 28, 28), np.uint8)
    for i in range(n):
        r0, c0 = g.integers(4, 12, size=2)
        x[i, r0:r0 + 14, c0:c0 + 3] = 255
        x[i, r0:r0 + 3, c0:c0 + 10] = g.integers(128, 256)
    return x, g.integers(0, 10, size=n).astype(np.uint8)


def write_tiny_mnist(data_dir, n_train=128, n_test=32):
    raw = os.path.join(data_dir, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        x, y = fake_digits(n, seed)
        _write_idx(os.path.join(raw, RAW_FILES[split][0]), x)
        _write_idx(os.path.join(raw, RAW_FILES[split][1]), y)
    return data_dir


def undo_zero_init(model, std=0.05):
    """Give every zero-initialised weight (the last conv of each residual branch and of the output,
    the label embedding) random values, as training would: then the output, and each branch and t,
    reach the result. Returns the model."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, std)
    return model


def short_chain(path, out, T=100):
    """A copy of the checkpoint at `path` whose diffusion has T steps instead of 1000: the scripts'
    1000-step sampler then runs the same loop in a tenth of the time. Returns `out`."""
    import checkpoint
    ckpt = checkpoint.load(path)
    checkpoint.save(out, dict(ckpt, diffusion_args=dict(ckpt["diffusion_args"], T=T)))
    return str(out)


@pytest.fixture
def tiny_data(tmp_path):
    return write_tiny_mnist(str(tmp_path / "data"))


@pytest.fixture
def tiny_unet():
    torch.manual_seed(0)
    return UNet(**TINY)


class ConstEps(torch.nn.Module):
    """A network whose eps_theta is a fixed tensor, whatever x_t and t."""

    def __init__(self, eps):
        super().__init__()
        self.eps = eps

    def forward(self, x, t):
        return self.eps.expand_as(x)


MU, S = 0.3, 0.2  # Gaussian data: x_0 ~ N(MU, S^2) in every pixel


class GaussianEps:
    """The optimal eps-predictor for x_0 ~ N(MU, S^2): E[eps | x_t] = sigma (x_t - a MU) / (a^2 S^2 + sigma^2)."""

    def __init__(self, d):
        self.d = d

    def __call__(self, x, t):
        ab = self.d.alphas_cumprod.to(x.device)[t].reshape(-1, 1, 1, 1)
        a, sigma = ab.sqrt(), (1 - ab).sqrt()
        return (sigma * (x - a * MU) / (ab * S ** 2 + 1 - ab)).float()


class GaussianV:
    """The optimal v-predictor for x_0 ~ N(MU, S^2) (Salimans & Ho 2022's v = sqrt(ab) eps - sqrt(1 - ab) x_0):
    E[v | x_t] = a E[eps | x_t] - sigma E[x_0 | x_t], with E[x_0 | x_t] = MU + a S^2 (x_t - a MU) / (a^2 S^2 + sigma^2),
    written out here, not taken from diffusion.py."""

    def __init__(self, d):
        self.d = d

    def __call__(self, x, t):
        ab = self.d.alphas_cumprod.to(x.device)[t].reshape(-1, 1, 1, 1)
        a, sigma, var = ab.sqrt(), (1 - ab).sqrt(), ab * S ** 2 + 1 - ab
        return (a * sigma * (x - a * MU) / var - sigma * (MU + a * S ** 2 * (x - a * MU) / var)).float()


def optimal_net(d):
    """The optimal predictor of Gaussian data for what d's network predicts (d.prediction: eps or v)."""
    return GaussianV(d) if d.prediction == "v" else GaussianEps(d)


def gaussian_samples(d, sampler, steps=None, n=4000, seed=0, spacing=None, net=None, eps_scale=1.0, **options):
    """n samples (n, 1, 2, 2) of a registered sampler from the optimal predictor of Gaussian data (or `net`),
    one torch.Generator of `seed`, no clipping; eps_scale as the Denoiser takes it."""
    from samplers import SAMPLERS, Denoiser, noise_source

    s, noise = SAMPLERS[sampler], noise_source(torch.Generator().manual_seed(seed))
    denoiser = Denoiser(net or optimal_net(d), d, clip=False, eps_scale=eps_scale)
    return s.fn(denoiser, noise((n, 1, 2, 2)), s.timesteps(d, steps, spacing), noise, **s.fixed, **options)
