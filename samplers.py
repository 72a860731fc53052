"""The samplers: every way this repo goes from noise x_T to a digit x_0, as one family.

Each sampler is one function with the discipline of k-diffusion's `sample_*` functions, on this
repo's discrete timesteps instead of sigmas:

    x_0 = sample_NAME(denoiser, x, ts, noise, callback=None, **options)

    denoiser  the network as a denoiser (`Denoiser`): denoiser(x, t) is its x_0 prediction at the integer
              timestep t; denoiser.diffusion is the schedule it was trained with, denoiser.eps_fn its
              eps_theta (whether the network predicts eps or v)
    x         the starting noise x_T ~ N(0, I)
    ts        the timesteps it visits, in order, ending with -1 (x_0); each step goes from t to t_next,
              the next entry (`timesteps` makes them for every sampler; restart's go back up as well)
    noise     the per-sample noise source: noise(shape) -> N(0, I) (`noise_source`)
    callback  callback(t, t_next, x) after each step, with the new x

`SAMPLERS` is the registry: each sampler's name, function, default spacing, options and NFE. sample.py,
the command-line flags, the tests and the sweep read it: a new sampler is one function and one entry.
Timesteps are 0-indexed (the paper's t + 1); t = -1 is x_0, where alphabar = 1.
"""
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from respace import SpacedDiffusion

SPACINGS = ("uniform", "quadratic", "logsnr", "karras")
DEFAULT_STEPS = 50  # the few-step samplers' steps when --sampling_steps is not given
# The log-SNR below which the logsnr and karras spacings place no step but the first: alpha_t = 0.005,
# where x_t keeps half a percent of the image. The linear schedule ends above it (lambda_T = -5.06),
# so its spacings are unchanged; the cosine schedule reaches -9.9 at T, in its last 4 steps.
LAMBDA_MIN = math.log(0.005)


# ---- the network as a denoiser, and the noise ------------------------------------------------------
class Denoiser:
    """denoiser(x, t): the x_0 that eps_theta(x_t, t) implies (eq. 4 inverted), clipped to [-1, 1] with
    `clip` (the authors' code, default on). t is an int: every sample of the batch is at t.
    net: the network (or its guided form, sample.guided), whose output diffusion.eps_theta turns into
    eps_theta (for a v-prediction model); eps_scale (scaled_eps) then divides that eps: the result is
    self.eps_fn. With the paper's eps-prediction and eps_scale 1, self.eps_fn is `net` itself."""

    def __init__(self, net, diffusion, clip=True, eps_scale=1.0):
        self.eps_fn, self.diffusion, self.clip = scaled_eps(diffusion.eps_theta(net), eps_scale), diffusion, clip

    def __call__(self, x, t):
        return self.diffusion.predict_x0(self.eps_fn, x, batch_t(x, t), self.clip)

    def alphabar(self, t):
        """alphabar_t as a Python float (float64); 1 at t = -1 (x_0). The samplers compute their step
        coefficients from these on the host and pass them to the device as kernel arguments: no copy."""
        if not hasattr(self, "_alphabar"):
            self._alphabar = self.diffusion.alphas_cumprod.tolist()
        return self._alphabar[t] if t >= 0 else 1.0

    def sigma(self, t):
        """sigma_t = sqrt((1 - ab_t) / ab_t) as a Python float, 0 at t = -1: the noise level of x_t / sqrt(ab_t),
        the VP model written as x_0 + sigma eps (Karras et al. 2022, eq. 1 with s(t) = sqrt(ab_t))."""
        ab = self.alphabar(t)
        return math.sqrt((1.0 - ab) / ab)


def scaled_eps(eps_fn, eps_scale):
    """Epsilon scaling (Ning et al. 2024, "Elucidating the exposure bias in diffusion models"): the network's
    eps_fn(x, t) with its prediction divided by `eps_scale`, a constant slightly above 1, at every step of every
    sampler; in float32 (a bf16 output divided by 1.005 would round the scaling away). The predicted noise
    is too large on the samples' own x_t, which drift from the training x_t (exposure bias); shrinking it
    corrects that without retraining. 1 returns `eps_fn` itself: the outputs are bitwise those without it.
    `eps_fn` must predict eps: Denoiser applies it to diffusion.eps_theta(net), the eps a v-prediction implies."""
    if eps_scale == 1:
        return eps_fn
    return lambda x, t: eps_fn(x, t).float() / eps_scale


def batch_t(x, t):
    """The int timestep t as the (B,) tensor the network and diffusion.py take."""
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)


def sample_seed(seed, i):
    """The 32-bit seed of sample i of a run with `seed`, mixed by NumPy's SeedSequence (torch's CPU
    generator keeps only the low 32 bits of a seed, so (seed << 32) | i would not do)."""
    return int(np.random.SeedSequence([seed % (1 << 64), i]).generate_state(1)[0])


class SampleNoise:
    """Per-sample random streams, as EDM's generate.py draws them (Karras et al. 2022): row i of every
    draw comes from its own CPU generator seeded with sample_seed(seed, indices[i]), so a sample depends
    only on (seed, its index), not on the batch it is drawn in nor on the device. Drawn on the CPU and
    copied to `device` (on CUDA asynchronously, from pinned memory: the one copy in a sampling step)."""

    def __init__(self, seed, indices, device="cpu"):
        self.device = torch.device(device)
        self.gens = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in indices]

    def __call__(self, shape):
        if shape[0] != len(self.gens):
            raise ValueError(f"{len(self.gens)} sample streams for a batch of {shape[0]}")
        z = torch.stack([torch.randn(shape[1:], generator=g) for g in self.gens])
        if self.device.type == "cuda":  # from pinned memory, the copy does not wait for the GPU's queue
            return z.pin_memory().to(self.device, non_blocking=True)
        return z.to(self.device)


def noise_source(generator, device="cpu"):
    """noise(shape) -> eps ~ N(0, I): per-sample streams (a SampleNoise, returned as it is), or one
    torch.Generator on `device` (None: torch's global one)."""
    if isinstance(generator, SampleNoise):
        return generator
    return lambda shape: torch.randn(shape, device=device, generator=generator)


# ---- the timesteps a sampler visits ------------------------------------------------------------------
def log_snr(diffusion):
    """lambda_t = log(alpha_t / sigma_t) = 0.5 log(alphabar_t / (1 - alphabar_t)), decreasing in t (float64)."""
    ab = diffusion.alphas_cumprod
    return 0.5 * torch.log(ab / (1 - ab))


def distinct(ts, last):
    """Increasing distinct integers ending at `last` from rounded targets: where rounding gave the same t
    twice, the later one moves up to the next free timestep (and, where that runs past `last`, the ones
    below it down)."""
    for i in range(1, len(ts)):
        ts[i] = max(ts[i], ts[i - 1] + 1)
    ts[-1] = last
    for i in range(len(ts) - 2, -1, -1):
        ts[i] = min(ts[i], ts[i + 1] - 1)
    return ts


def timesteps(diffusion, steps, spacing="uniform"):
    """The `steps` timesteps a sampler calls the network at, from T-1 down to 0, then -1 (x_0):
        uniform    evenly spaced in t (DDIM's "linear" spacing, here from 0 to T-1); steps = T is every t;
        quadratic  t_i = (i / (S-1))^2 (T-1), denser near t = 0. The DDIM paper's CIFAR-10 spacing;
                   its code takes linspace(0, sqrt(0.8 T), S)^2 truncated to int, which stops near
                   t = 800 and repeats t = 0 for 50 steps. Here it ends at T-1 and never repeats;
        logsnr     evenly spaced in the log-SNR lambda_t (Lu et al. 2022, DPM-Solver's "logSNR"
                   spacing, their choice for pixel-space models);
        karras     sigma_t = sqrt((1 - ab_t) / ab_t) spaced as in Karras et al. 2022, eq. 5, rho = 7.
    logsnr and karras span lambda from lambda_0 down to max(lambda_T, LAMBDA_MIN); t = T-1 is always
    the first step. Each target is rounded to the nearest timestep (nearest in lambda for logsnr and
    karras), then made distinct, so S steps always give S distinct timesteps."""
    T = diffusion.T
    if not 1 <= steps <= T:
        raise ValueError(f"sampling steps must be in [1, {T}], got {steps}")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {', '.join(SPACINGS)}, got {spacing!r}")
    if steps == 1:  # a single step must start from x_T
        return [T - 1, -1]
    u = torch.linspace(0, 1, steps, dtype=torch.float64)
    if spacing == "uniform":  # written as linspace(0, T-1): its rounding of exact halves is the one kept
        ts = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long()
    elif spacing == "quadratic":
        ts = (torch.linspace(0, math.sqrt(T - 1), steps, dtype=torch.float64) ** 2).round().long()
    else:
        lam = log_snr(diffusion)
        lam_T = max(float(lam[-1]), LAMBDA_MIN)  # the cosine schedule's last steps carry no signal
        if spacing == "logsnr":
            target = lam[0] + u * (lam_T - lam[0])
        else:
            ab = diffusion.alphas_cumprod
            rho, sig0, sig_T = 7.0, ((1 - ab[0]) / ab[0]).sqrt(), math.exp(-lam_T)
            target = -torch.log((sig0 ** (1 / rho) + u * (sig_T ** (1 / rho) - sig0 ** (1 / rho))) ** rho)
        ts = (lam[None, :] - target[:, None]).abs().argmin(1)
    return distinct(ts.tolist(), T - 1)[::-1] + [-1]


def restart_timesteps(diffusion, steps, spacing="logsnr", sigma_min=0.06, sigma_max=0.30, times=1, share=0.2):
    """The timesteps of Restart sampling (Xu et al. 2023, Algorithm 1) in `steps` solver steps: an ODE
    path over steps - times * n timesteps (n = floor(share * steps / times) per restart), and on reaching
    the interval's lower end t_min, `times` restarts: a jump back up to t_max (the forward process), then
    n ODE steps down to t_min again, evenly in the log-SNR. The interval is the paper's for CIFAR-10
    under the VP model, sigma = sqrt((1 - ab) / ab) in [0.06, 0.30] (t = 14 to 88 here; MNIST shares the
    [-1, 1] pixel range), t_min moved to the nearest timestep of the main path. One restart with a fifth
    of the steps is our choice: restarts of a single (first-order) step across that interval narrow
    Gaussian data's std from 0.20 to 0.13-0.14 at S = 10 (tests/test_samplers.py). Below n = 2 there is
    no restart: the plain ODE path."""
    n = int(share * steps / times) if times else 0
    n, times = (n, times) if n >= 2 else (0, 0)
    main = timesteps(diffusion, steps - times * n, spacing)
    if not times:
        return main
    lam = log_snr(diffusion)
    t_min = min(sorted(main[:-1]), key=lambda t: abs(float(lam[t]) + math.log(sigma_min)))  # lambda = -log sigma
    t_max = max(int((lam + math.log(sigma_max)).abs().argmin()), t_min + n)
    target = lam[t_min] + torch.linspace(0, 1, n + 1, dtype=torch.float64) * (lam[t_max] - lam[t_min])
    up = distinct((lam[None, t_min:t_max + 1] - target[:, None]).abs().argmin(1).add(t_min).tolist(), t_max)
    i = main.index(t_min) + 1
    return main[:i] + times * up[::-1] + main[i:]


# ---- the samplers ----------------------------------------------------------------------------------
def sample_ddpm(denoiser, x, ts, noise, callback=None):
    """Algorithm 2 of Ho et al. 2020: x_{t-1} = mu_theta(x_t, t) + sigma_t z at every timestep, each step
    diffusion.p_sample (the paper's sampler; ts must visit every t)."""
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = denoiser.diffusion.p_sample(denoiser.eps_fn, x, batch_t(x, t), noise(x.shape), denoiser.clip)
        if callback:
            callback(t, t_next, x)
    return x


def sample_ddpm_respaced(denoiser, x, ts, noise, callback=None, variance="beta"):
    """Algorithm 2 of Ho et al. 2020 on the chain restricted to the timesteps ts (improved-diffusion's
    respacing, Nichol & Dhariwal 2021, section 4): each step is diffusion.p_sample on respace.SpacedDiffusion,
    the chain whose step from t to t_next has its own beta' = 1 - ab_t / ab_next, with sigma^2 = beta'
    ("beta", default) or beta-tilde' = beta' (1 - ab_next) / (1 - ab_t) ("beta_tilde"); no noise on the step
    to x_0 (none drawn). On every timestep it is sample_ddpm with var_type fixed_large or fixed_small."""
    chain = SpacedDiffusion(denoiser.diffusion, ts[:-1], "fixed_large" if variance == "beta" else "fixed_small")
    eps_fn = chain.wrap(denoiser.eps_fn)
    for i, t, t_next in zip(range(chain.T - 1, -1, -1), ts[:-1], ts[1:]):  # the chain's step i: t_i -> t_{i-1}
        z = noise(x.shape) if t_next >= 0 else torch.zeros_like(x)
        x = chain.p_sample(eps_fn, x, batch_t(x, i), z, denoiser.clip)
        if callback:
            callback(t, t_next, x)
    return x


def churned(denoiser, t, gamma):
    """The timestep EDM's churn raises t to (Karras et al. 2022, Algorithm 2, line 5): sigma_t (1 + gamma)
    rounded to the nearest timestep in log sigma, at least t and at most T-1. The network knows only the
    integer timesteps; the step then goes on from that timestep's own sigma."""
    if gamma <= 0:
        return t
    if not hasattr(denoiser, "_log_sigma"):
        denoiser._log_sigma = -log_snr(denoiser.diffusion)  # log sigma_t = -lambda_t, increasing in t
    target = math.log(denoiser.sigma(t)) + math.log1p(gamma)
    return max(t, int((denoiser._log_sigma - target).abs().argmin()))


def heun_step(denoiser, x, t, t_next):
    """x at sigma_t -> x at sigma_{t_next} by Heun's method (Karras et al. 2022, Algorithm 1, lines 4-8) on
    the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma, x = x_t / sqrt(ab_t) and D the x_0
    prediction of the network at x_t; its Euler step (DDIM's) is all of the step to sigma = 0 (x_0),
    which returns D: one network evaluation there, two elsewhere."""
    s, s_next = denoiser.sigma(t), denoiser.sigma(t_next)
    x0 = denoiser(math.sqrt(denoiser.alphabar(t)) * x, t)
    if t_next < 0:
        return x0
    x_euler = (s_next / s) * x + (1.0 - s_next / s) * x0
    x0_next = denoiser(math.sqrt(denoiser.alphabar(t_next)) * x_euler, t_next)
    h = s_next - s
    return x + (0.5 * h / s) * (x - x0) + (0.5 * h / s_next) * (x_euler - x0_next)


def sample_edm(denoiser, x, ts, noise, callback=None, churn=30.0, s_tmin=0.01, s_tmax=1.0, s_noise=1.007):
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2) on the timesteps ts, in the VP model's
    sigma = sqrt((1 - ab) / ab) on x / sqrt(ab): at a step from t with s_tmin <= sigma_t <= s_tmax, the noise
    level is first raised to sigma_t (1 + gamma), gamma = min(churn / S, sqrt(2) - 1) over S steps, by
    adding noise of std s_noise sqrt(sigma_hat^2 - sigma_t^2); then Heun's step (heun_step) from there.
    The raised level is rounded to a timestep (churned; a gamma too small to reach the next timestep adds
    no noise). churn = 0 is their deterministic Heun sampler (Algorithm 1). Defaults: their Table 5's
    settings for CIFAR-10 under the VP model (the same [-1, 1] pixels). NFE: 2 S - 1."""
    gamma = min(churn / (len(ts) - 1), math.sqrt(2) - 1)
    x = (1.0 / math.sqrt(denoiser.alphabar(ts[0]))) * x
    for t, t_next in zip(ts[:-1], ts[1:]):
        t_hat = churned(denoiser, t, gamma) if s_tmin <= denoiser.sigma(t) <= s_tmax else t
        if t_hat != t:
            x = x + (s_noise * math.sqrt(denoiser.sigma(t_hat) ** 2 - denoiser.sigma(t) ** 2)) * noise(x.shape)
        x = heun_step(denoiser, x, t_hat, t_next)
        if callback:
            callback(t, t_next, math.sqrt(denoiser.alphabar(t_next)) * x)
    return x


def sample_ddim(denoiser, x, ts, noise, callback=None, eta=0.0):
    """DDIM (Song et al. 2021, eq. 12): x_next = sqrt(ab_next) x0_hat + sqrt(1 - ab_next - sigma^2) eps_hat
    + sigma z, with sigma^2 = eta^2 (1 - ab_next) / (1 - ab_t) (1 - ab_t / ab_next) (their eq. 16). eta = 0
    is deterministic given x_T (no noise drawn); eta = 1 on consecutive steps is Algorithm 2 with
    sigma_t^2 = beta-tilde_t. With eps re-derived from the (clipped) x0_hat, the step is a combination of
    x0_hat and x_t whose coefficients are computed in float64 (1 - ab_t / ab_next cancels); sigma is
    float32's square root of sigma^2."""
    for t, t_next in zip(ts[:-1], ts[1:]):
        x0 = denoiser(x, t)
        ab, ab_next = denoiser.alphabar(t), denoiser.alphabar(t_next)
        var = eta ** 2 * (1 - ab_next) / (1 - ab) * (1 - ab / ab_next)
        c_eps = math.sqrt(max(1 - ab_next - var, 0.0)) / math.sqrt(1 - ab)
        x = (math.sqrt(ab_next) - c_eps * math.sqrt(ab)) * x0 + c_eps * x
        if eta != 0:
            x = x + float(torch.tensor(var, dtype=torch.float32).sqrt()) * noise(x.shape)
        if callback:
            callback(t, t_next, x)
    return x


def alpha_sigma_lambda(ab):
    """(alpha, sigma, lambda) of alphabar `ab` (a float): sqrt(ab), sqrt(1 - ab) and the log-SNR
    lambda = log(alpha / sigma) (Lu et al. 2022, section 2), as float64 numbers."""
    return math.sqrt(ab), math.sqrt(1.0 - ab), 0.5 * math.log(ab / (1.0 - ab))


def dpmpp_2m_step(denoiser, x, t, t_next, noise, history, sde=False):
    """x_t -> x_{t_next} by DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2: data prediction, multistep,
    second order), or with sde=True by SDE-DPM-Solver++(2M) (their section 5; the "midpoint" form of
    k-diffusion's sample_dpmpp_2m_sde). With alpha = sqrt(ab), sigma = sqrt(1 - ab), the log-SNR
    lambda = log(alpha / sigma) and h = lambda_next - lambda_t:
        ODE: x = (sigma_next / sigma_t) x_t + alpha_next (1 - e^-h) D
        SDE: x = (sigma_next / sigma_t) e^-h x_t + alpha_next (1 - e^-2h) D + sigma_next sqrt(1 - e^-2h) z
    where D is the x_0 prediction, corrected with the previous step's by (1 / 2r) (x0 - x0_prev),
    r = h_prev / h (first order on the first step: then the ODE step is DDIM with eta 0, and the SDE
    step between consecutive timesteps is Algorithm 2 with sigma^2 = beta-tilde). The step to x_0
    returns the x_0 prediction. history: the previous step's x_0 prediction and h (a dict, updated)."""
    x0 = denoiser(x, t)
    if t_next < 0:
        return x0
    _, s, lam = alpha_sigma_lambda(float(denoiser.alphabar(t)))
    a_next, s_next, lam_next = alpha_sigma_lambda(float(denoiser.alphabar(t_next)))
    h = lam_next - lam
    decay = -math.expm1(-2 * h) if sde else -math.expm1(-h)  # 1 - e^-2h or 1 - e^-h
    x = (s_next / s * (math.exp(-h) if sde else 1.0)) * x + (a_next * decay) * x0
    if history.get("x0") is not None:
        x = x + (0.5 * a_next * decay * h / history["h"]) * (x0 - history["x0"])  # (1 / 2r), r = h_prev / h
    if sde:
        x = x + (s_next * math.sqrt(-math.expm1(-2 * h))) * noise(x.shape)
    history.update(x0=x0, h=h)
    return x


def sample_dpmpp_2m(denoiser, x, ts, noise, callback=None, sde=False):
    """DPM-Solver++(2M), one network evaluation a step (dpmpp_2m_step), or with sde=True its SDE form."""
    history = {}
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = dpmpp_2m_step(denoiser, x, t, t_next, noise, history, sde)
        if callback:
            callback(t, t_next, x)
    return x


def sample_restart(denoiser, x, ts, noise, callback=None):
    """Restart sampling (Xu et al. 2023, Algorithm 1) with DPM-Solver++(2M) as its ODE solver (the paper
    uses Heun's, two network evaluations a step; 2M takes one), on restart_timesteps. A step up
    (t_next > t) is the forward process itself, q(x_next | x_t) = N(sqrt(ab_next / ab_t) x_t,
    (1 - ab_next / ab_t) I) (eq. 4 between two noise levels), with no network evaluation; after it the
    solver starts afresh (its first step is first order)."""
    history = {}
    for t, t_next in zip(ts[:-1], ts[1:]):
        if t_next > t:
            history.clear()
            r = float(denoiser.alphabar(t_next) / denoiser.alphabar(t))
            x = math.sqrt(r) * x + math.sqrt(1.0 - r) * noise(x.shape)
        else:
            x = dpmpp_2m_step(denoiser, x, t, t_next, noise, history)
        if callback:
            callback(t, t_next, x)
    return x


# ---- the registry ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sampler:
    """A sampler of the family: `fn` with `fixed` keyword arguments; `spacing` its default timestep
    spacing (None: every timestep, T steps, no --sampling_steps or --spacing); `options` the keyword
    options a user may set, with their defaults and help; `nfe(steps)` the network evaluations per sample
    (unguided); `grid` makes its timesteps (diffusion, steps, spacing) -> ts."""
    name: str
    fn: Callable
    spacing: str | None
    help: str
    options: dict = field(default_factory=dict)  # name -> (default, help)
    fixed: dict = field(default_factory=dict)
    grid: Callable = timesteps
    nfe: Callable = lambda steps: steps  # noqa: E731 - one network evaluation a step

    def timesteps(self, diffusion, steps=None, spacing=None):
        """The timesteps it visits: `steps` (default DEFAULT_STEPS) placed by `spacing` (default its own);
        every timestep for a sampler without a spacing (ddpm)."""
        if self.spacing is None:
            return timesteps(diffusion, diffusion.T)
        return self.grid(diffusion, DEFAULT_STEPS if steps is None else steps, spacing or self.spacing)


# Each few-step sampler's own spacing: DDIM's paper and code space evenly in t, as does improved-diffusion's
# respacing (ddpm-respaced); DPM-Solver++ (Lu et al. 2022) recommends log-SNR spacing for pixel-space models,
# restart takes its ODE solver's, and edm its paper's (eq. 5). Measured on
# the linear-schedule checkpoint published at ab316d2, at 20 NFE (docs/sampling.md): each is the best or
# within the noise of the best.
SAMPLERS = {s.name: s for s in [
    Sampler("ddpm", sample_ddpm, None, "the paper's T-step ancestral sampler (Algorithm 2)"),
    Sampler("ddim", sample_ddim, "uniform", "DDIM, Song et al. 2021",
            options={"eta": (0.0, "0 = deterministic (default), 1 = ancestral-like")}),
    Sampler("dpm++2m", sample_dpmpp_2m, "logsnr", "DPM-Solver++(2M), Lu et al. 2022"),
    Sampler("dpm++2m-sde", sample_dpmpp_2m, "logsnr", "its stochastic form", fixed={"sde": True}),
    Sampler("restart", sample_restart, "logsnr", "Restart sampling, Xu et al. 2023, with DPM-Solver++(2M) steps",
            grid=restart_timesteps),
    Sampler("ddpm-respaced", sample_ddpm_respaced, "uniform",
            "Algorithm 2 on the steps' own betas, Nichol & Dhariwal 2021's respacing",
            options={"variance": ("beta", "sigma^2 of each step: the respaced beta (default) or beta_tilde",
                                  ("beta", "beta_tilde"))}),
    Sampler("edm", sample_edm, "karras", "EDM's stochastic Heun sampler, Karras et al. 2022 (2 NFE a step, 1 on "
            "the last)", options={
                "churn": (30.0, "S_churn, the noise added over all steps: gamma = min(churn / steps, sqrt(2) - 1) "
                                "a step (default 30; 0 = deterministic Heun)"),
                "s_tmin": (0.01, "S_tmin: churn only where sigma = sqrt((1 - ab) / ab) >= s_tmin (default 0.01)"),
                "s_tmax": (1.0, "S_tmax: churn only where sigma <= s_tmax (default 1)"),
                "s_noise": (1.007, "S_noise: the churn noise's std factor (default 1.007)")},
            nfe=lambda steps: 2 * steps - 1),
]}


# ---- the sampler settings the repo uses, as sample_func's keyword arguments (as_flags: as flags) ------------
# The recommended fast sampler: the best measured at 100 NFE or fewer (docs/sampling.md). The experiments that
# judge with "the recommended sampler" read it here; the README, load_and_eval.sh and the notebook name it in
# their text.
RECOMMENDED = dict(sampler="dpm++2m-sde", sampling_steps=50)
# What --eval_every samples with: the best stochastic sampler at 20 NFE (docs/sampling.md), from fixed
# noise (per-sample streams of this seed, not the run's), the same at every evaluation and in every run.
EVAL_SAMPLER = dict(sampler="dpm++2m-sde", sampling_steps=20, spacing="logsnr")
EVAL_SEED = 0


def as_flags(setting):
    """A setting as the flags of evaluate.py and run.py: {"sampler": "ddim", "eta": 1.0} -> ["--sampler", "ddim",
    "--eta", "1.0"]."""
    return [arg for k, v in setting.items() for arg in (f"--{k}", str(v))]


# The options every sampler takes, applied to the network by its Denoiser (scaled_eps, on the eps a v-prediction
# implies), not by the sampler functions: {option: (default, help)}.
SHARED_OPTIONS = {"eps_scale": (1.0, "epsilon scaling (Ning et al. 2024): eps_theta divided by this at every step, "
                                     "slightly above 1 (e.g. 1.005) against exposure bias (default 1 = off)")}


def options():
    """Every sampler option of the registry: {option: (the samplers that take it, (default, help[, choices]))};
    the shared options (SHARED_OPTIONS) last, taken by every sampler."""
    out = {}
    for s in SAMPLERS.values():
        for option, spec in s.options.items():
            out.setdefault(option, ([], spec))[0].append(s.name)
    return {**out, **{option: (list(SAMPLERS), spec) for option, spec in SHARED_OPTIONS.items()}}
