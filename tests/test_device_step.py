"""The training and sampling steps without host stalls (diffusion.GaussianDiffusion.on, cuda_graph.GraphedStep):
the schedule per device, no float64 on a device that lacks it, and the step function that CUDA captures."""
import tempfile

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import diffusion
import train
from config import TrainConfig
from conftest import TINY, slow
from diffusion import GaussianDiffusion
from model import UNet
from samplers import SAMPLERS, Denoiser


def test_schedule_dtype_per_device():
    assert diffusion.schedule_dtype("mps") == torch.float32  # MPS has no float64
    assert diffusion.schedule_dtype("cpu") == diffusion.schedule_dtype("cuda:1") == torch.float64
    d = GaussianDiffusion()
    cpu = d.on("cpu")
    assert d.on(torch.device("cpu")) is cpu  # made once per device
    assert cpu.sqrt_alphas_cumprod is d.sqrt_alphas_cumprod  # on the CPU: the arrays themselves
    meta = d.on("meta")
    assert meta.betas.device.type == "meta" and meta.betas.dtype == torch.float64


class NoFloat64On(TorchDispatchMode):
    """Fails on any operation that reads or makes a float64 tensor on `device`."""

    def __init__(self, device):
        super().__init__()
        self.device = device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten((args, kwargs, out))[0]:
            if isinstance(t, torch.Tensor) and t.device.type == self.device and t.dtype == torch.float64:
                raise AssertionError(f"{func} has a float64 tensor on {self.device}")
        return out


@pytest.mark.parametrize("schedule, prediction", [("linear", "eps"), ("cosine", "eps"), ("cosine", "v")])
def test_no_float64_reaches_a_device_without_it(schedule, prediction, monkeypatch):
    """The meta device stands in for MPS (no MPS here): given MPS's schedule dtype, a training step (loss with
    Min-SNR weights, backward), a few steps of every sampler and the bound's terms put no float64 on it
    (v-prediction's target and conversion to eps included)."""
    monkeypatch.setattr(diffusion, "schedule_dtype", lambda d: torch.float32 if torch.device(d).type in
                        ("mps", "meta") else torch.float64)
    torch.manual_seed(0)
    net = UNet(**TINY).to("meta")
    d = GaussianDiffusion(schedule=schedule, prediction=prediction)
    x0 = torch.empty(4, 1, 28, 28, device="meta")
    t = torch.randint(0, d.T, (4,), device="meta")
    with NoFloat64On("meta"):
        d.training_losses(net, x0, t=t, noise=torch.randn_like(x0), weight="min_snr").mean().backward()
        with torch.no_grad():
            for s in SAMPLERS.values():
                ts = s.timesteps(d, 3)[-4:] if s.spacing is None else s.timesteps(d, 3)
                s.fn(Denoiser(net, d), torch.randn_like(x0), ts, lambda shape: torch.randn(shape, device="meta"),
                     **s.fixed)
            d.prior_bpd(x0)
            d.vb_term_bpd(net, x0, t, torch.randn_like(x0))


def tiny_run(graph_step, compile_step=False, steps=4, ema_decays=()):
    """A few steps of train_func, eager or with --graph_step (on a CPU: GraphedStep runs the step it would
    capture, on device tensors, without capturing); compile_step: the step function torch.compile'd."""
    torch.manual_seed(1)
    images = torch.randint(0, 256, (64, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    cfg = TrainConfig(n_epochs=5, max_steps=steps, batch_size=16, save_every=100, log_every=2, warmup=3, seed=3,
                      ema_decays=ema_decays, graph_step=graph_step)
    net = UNet(**{**TINY, "dropout": 0.1, "ch_mult": (1,), "attn_resolutions": ()})  # few tensors: compiles faster
    make_step = train.make_step
    if compile_step:
        train.make_step = lambda *a, **k: torch.compile(make_step(*a, **k), backend="aot_eager")
    try:
        return train.train_func(net, GaussianDiffusion(), images, cfg, tempfile.mktemp(suffix=".pt"),
                                progress=False)[0]
    finally:
        train.make_step = make_step


def test_the_captured_step_function_trains_as_the_eager_step():
    """On a CPU, graph_step=True runs the step that CUDA captures (learning rate and EMA weight as device
    tensors refilled every step) without capturing it: the same losses as the eager step to the bit, the
    EMA within float32 rounding (it is updated by sub, mul, add instead of lerp)."""
    eager, graphed = tiny_run(False), tiny_run(True)
    assert torch.equal(eager["loss_history"], graphed["loss_history"])
    for k, v in eager["ema"].items():
        torch.testing.assert_close(graphed["ema"][k], v, rtol=0, atol=1e-6)


@slow  # 18-23 s on 2 cores, most of it compiling: outside CI's budget (DDPM_SLOW_TESTS=1 runs it)
def test_the_captured_step_function_compiles():
    """Compiled with torch.compile (backend aot_eager, which breaks its graph at the draws), the step CUDA
    captures gives the eager graphed step's losses within 1e-5."""
    graphed, compiled = tiny_run(True), tiny_run(True, compile_step=True)
    torch.testing.assert_close(compiled["loss_history"], graphed["loss_history"], rtol=0, atol=1e-5)


def test_the_captured_step_function_updates_the_extra_emas():
    """--ema_decays on the path CUDA captures (each average's weight a device scalar of its own, refilled every
    step): the same losses as the eager step to the bit, each extra EMA within float32 rounding, and each
    extra updated with its own weight (0.2 parts from the main EMA's warm-up at step 2)."""
    eager, graphed = tiny_run(False, ema_decays=(0.2, 0.9)), tiny_run(True, ema_decays=(0.2, 0.9))
    assert torch.equal(eager["loss_history"], graphed["loss_history"])
    for d in ("0.2", "0.9"):
        for k, v in eager["ema_extra"][d].items():
            torch.testing.assert_close(graphed["ema_extra"][d][k], v, rtol=0, atol=1e-6)
    assert not all(torch.equal(graphed["ema_extra"]["0.2"][k], v) for k, v in graphed["ema"].items())
