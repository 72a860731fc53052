"""All diffusion math of Ho, Jain, Abbeel 2020 ("DDPM"), in one place; the network is an argument.

Notation follows the paper: beta_t, alpha_t = 1 - beta_t, alphabar_t = prod_{s<=t} alpha_s.
Timesteps are 0-indexed here: t in {0, ..., T-1} is the paper's t+1 in {1, ..., T}.
The schedule is computed in float64 and cast to float32 only when it meets a batch (`bcast`).
Data live in [-1, 1] (paper section 3.3): `to_model_range` / `from_model_range` are the only
place where pixels are scaled.

Where to find the paper here (equation numbers are the DDPM paper's unless another paper is named):
    eq. 4         q(x_t | x_0), the forward process in closed form   q_mean_variance, q_sample
    eq. 5         the variational bound L_T + sum L_{t-1} + L_0       prior_bpd, vb_term_bpd
    eqs. 6-7      the posterior q(x_{t-1} | x_t, x_0)                 q_posterior_mean_variance
    section 3.2   sigma_t^2 = beta_t or beta-tilde_t                  GaussianDiffusion(var_type=...)
    eq. 11        the mean mu_theta(x_t, t) from eps_theta           p_mean_variance
    eqs. 12, 14   the eps-prediction loss and L_simple                training_losses
    Min-SNR-gamma loss weighting (Hang et al. 2023)                   loss_weights
    cosine schedule, eq. 17 of Nichol & Dhariwal 2021                 cosine_betas
    Algorithm 1   training                                            training_losses (the loop: train.py)
    Algorithm 2   sampling                                            p_sample, p_sample_loop
    eq. 13        the discrete decoder p_theta(x_0 | x_1)             discretized_gaussian_log_likelihood
    DDIM eqs. 12, 16 (Song, Meng, Ermon 2021)                         ddim_mean_variance, ddim_sample_loop
    DPM-Solver++(2M), Algorithm 2 of Lu et al. 2022, and its SDE form  dpmpp_2m_step, dpmpp_sample_loop
    Restart sampling, Algorithm 1 of Xu et al. 2023                    restart_pairs, restart_sample_loop
All samplers share one skeleton, `reverse_loop`, and differ only in their step. They draw their noise
through `draw_noise`: per-sample streams (SampleNoise) make sample i depend on (seed, i) alone.
"""
import math

import numpy as np
import torch
from tqdm.auto import tqdm


def to_model_range(x01):
    """Images in [0, 1] -> [-1, 1], the range the reverse process is defined on."""
    return x01 * 2.0 - 1.0


def from_model_range(x):
    """[-1, 1] -> [0, 1], clamped."""
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


def to_uint8(x):
    """[-1, 1] float batch (B, 1, H, W) -> uint8 (B, H, W), rounding to the nearest pixel value."""
    return (from_model_range(x) * 255.0).round().to(torch.uint8)[:, 0]


def bcast(c, ndim):
    """(B,) per-example coefficients (float64 schedule values, or a mask) -> float32 (B, 1, ..., 1)
    that broadcasts over a batch of `ndim` dimensions. The one place where broadcasting happens:
    every formula below computes its coefficients in float64 and casts them here."""
    return c.float().reshape(-1, *([1] * (ndim - 1)))


def extract(arr, t, shape):
    """arr[t] of a float64 schedule for a batch of timesteps t (B,), as float32 (B, 1, 1, 1)."""
    return bcast(arr.to(t.device)[t], len(shape))


def sample_seed(seed, i):
    """The 32-bit seed of sample i of a run with `seed`, mixed by NumPy's SeedSequence (torch's CPU
    generator keeps only the low 32 bits of a seed, so (seed << 32) | i would not do)."""
    return int(np.random.SeedSequence([seed % (1 << 64), i]).generate_state(1)[0])


class SampleNoise:
    """Per-sample random streams, as EDM's generate.py draws them (Karras et al. 2022): row i of every
    draw comes from its own CPU generator seeded with sample_seed(seed, indices[i]), so a sample depends
    only on (seed, its index), not on the batch it is drawn in nor on the device. Drawn on the CPU and
    moved to `device`."""

    def __init__(self, seed, indices, device="cpu"):
        self.device = torch.device(device)
        self.gens = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in indices]

    def randn(self, shape):
        if shape[0] != len(self.gens):
            raise ValueError(f"{len(self.gens)} sample streams for a batch of {shape[0]}")
        return torch.stack([torch.randn(shape[1:], generator=g) for g in self.gens]).to(self.device)


def draw_noise(shape, generator=None, device="cpu"):
    """eps ~ N(0, I) of `shape`, the one place the samplers draw noise: from per-sample streams
    (a SampleNoise), or from one torch.Generator on `device` (None: torch's global one)."""
    if isinstance(generator, SampleNoise):
        return generator.randn(shape)
    return torch.randn(shape, device=device, generator=generator)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log p(x) of the discrete decoder (eq. 13, section 3.3), elementwise.

    x holds pixel values 2u/255 - 1 for u in {0..255}; each is given the Gaussian mass of its bin
    [x - 1/255, x + 1/255], the edge bins extended to -inf and +inf so the 256 masses sum to 1.
    The exact normal CDF is used (the authors' code uses a tanh approximation).
    """
    inv_std = torch.exp(-log_scale)
    cdf_plus = torch.special.ndtr(inv_std * (x - mean + 1.0 / 255.0))
    cdf_min = torch.special.ndtr(inv_std * (x - mean - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def linear_betas(T, beta_start, beta_end):
    """The paper's schedule: beta_t linear from beta_start to beta_end (section 4)."""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def cosine_betas(T, s=0.008, max_beta=0.999):
    """The cosine schedule of Nichol & Dhariwal 2021 (eq. 17): alphabar_t = f(t) / f(0) with
    f(t) = cos((t / T + s) / (1 + s) * pi / 2)^2, and beta_t = 1 - alphabar_t / alphabar_{t-1}
    clipped at max_beta = 0.999 as in their paper (it avoids a singularity at t = T). It destroys
    information more slowly than the linear schedule, which on small images spends its last
    steps on almost pure noise."""
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


SCHEDULES = ("linear", "cosine")
# The log-SNR below which the logsnr and karras spacings place no step but the first: alpha_t = 0.005,
# where x_t keeps half a percent of the image. The linear schedule ends above it (lambda_T = -5.06),
# so its spacings are unchanged; the cosine schedule reaches -9.9 at T, in its last 4 steps.
LAMBDA_MIN = math.log(0.005)
LOSS_WEIGHTS = ("none", "min_snr")


class GaussianDiffusion:
    """The forward process q, the L_simple loss and the ancestral sampler of Algorithm 2.

    var_type: the reverse-process variance sigma_t^2 (section 3.2): "fixed_large" = beta_t
    (the paper's CIFAR-10 setting, our default) or "fixed_small" = beta-tilde_t (eq. 7).
    schedule: "linear" (the paper's, from beta_start to beta_end) or "cosine" (Nichol & Dhariwal
    2021; beta_start and beta_end are then unused). Everything below is computed from the betas,
    so the samplers and the variational bound hold for either.
    """

    def __init__(self, T=1000, beta_start=1e-4, beta_end=0.02, var_type="fixed_large", schedule="linear"):
        if var_type not in ("fixed_large", "fixed_small"):
            raise ValueError(f"var_type must be fixed_large or fixed_small, got {var_type!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be linear or cosine, got {schedule!r}")
        self.args = dict(T=T, beta_start=beta_start, beta_end=beta_end, var_type=var_type, schedule=schedule)
        self.T, self.var_type = T, var_type
        b = self.betas = linear_betas(T, beta_start, beta_end) if schedule == "linear" else cosine_betas(T)
        assert ((b > 0) & (b <= 1)).all(), "betas must lie in (0, 1]"
        self.alphas = 1.0 - b
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()
        # Posterior q(x_{t-1} | x_t, x_0) = N(mean, beta-tilde_t I), eqs. 6-7.
        self.posterior_variance = b * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta-tilde_0 = 0; clip the log as the authors' code does, so fixed_small stays finite.
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = b * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1.0 - self.alphas_cumprod)
        # sigma_t^2 of the reverse process. At the paper's t = 1 (our index 0) both choices use
        # beta-tilde_1, as the authors' code does, so the decoder's variance is not 0
        # (beta-tilde is 0 there; the sampler adds no noise at that step either way).
        if var_type == "fixed_large":
            self.model_variance = torch.cat([self.posterior_variance[1:2], b[1:]])
        else:
            self.model_variance = torch.exp(self.posterior_log_variance_clipped)

    # ---- forward process --------------------------------------------------------------
    def q_mean_variance(self, x0, t):
        """q(x_t | x_0) = N(sqrt(alphabar_t) x_0, (1 - alphabar_t) I), eq. 4."""
        mean = extract(self.sqrt_alphas_cumprod, t, x0.shape) * x0
        var = extract(1.0 - self.alphas_cumprod, t, x0.shape)
        return mean, var

    def q_sample(self, x0, t, noise):
        """Draw x_t ~ q(x_t | x_0) by reparameterisation (eq. 4)."""
        return (extract(self.sqrt_alphas_cumprod, t, x0.shape) * x0
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise)

    def q_posterior_mean_variance(self, x0, xt, t):
        """Mean and variance of q(x_{t-1} | x_t, x_0), eqs. 6-7."""
        mean = (extract(self.posterior_mean_coef1, t, xt.shape) * x0
                + extract(self.posterior_mean_coef2, t, xt.shape) * xt)
        return mean, extract(self.posterior_variance, t, xt.shape)

    def predict_x0_from_eps(self, xt, t, eps):
        """x_0 = (x_t - sqrt(1 - alphabar_t) eps) / sqrt(alphabar_t), inverting eq. 4."""
        return (extract(self.sqrt_recip_alphas_cumprod, t, xt.shape) * xt
                - extract(self.sqrt_recipm1_alphas_cumprod, t, xt.shape) * eps)

    # ---- training -----------------------------------------------------------------------
    def draw_t_and_noise(self, shape, device, dtype=torch.float32, generator=None):
        """t uniform in {0, ..., T-1} (the paper's {1, ..., T}), (B,), and eps ~ N(0, I) of `shape`."""
        t = torch.randint(0, self.T, (shape[0],), device=device, generator=generator)
        return t, torch.randn(shape, device=device, dtype=dtype, generator=generator)

    def loss_weights(self, t, kind="none", gamma=5.0):
        """Per-example weights of the eps-prediction loss, (B,) float32, or None for "none" (L_simple).
        "min_snr": Min-SNR-gamma (Hang et al. 2023): the x_0 loss weighted by min(SNR_t, gamma), which
        for eps-prediction is min(SNR_t, gamma) / SNR_t with SNR_t = ab_t / (1 - ab_t): the many easy,
        low-noise timesteps (SNR up to 1e4 here) stop dominating the gradient."""
        if kind == "none":
            return None
        if kind != "min_snr":
            raise ValueError(f"loss weight must be one of {', '.join(LOSS_WEIGHTS)}, got {kind!r}")
        snr = self.alphas_cumprod.to(t.device)[t] / (1 - self.alphas_cumprod.to(t.device)[t])
        return (snr.clamp(max=gamma) / snr).float()

    def training_losses(self, model, x0, generator=None, y=None, t=None, noise=None, weight="none", gamma=5.0):
        """Algorithm 1, lines 2-5: L_simple (eq. 14), the loss of eq. 12 without its weight:
        E_{t, eps} || eps - eps_theta(sqrt(ab_t) x0 + sqrt(1-ab_t) eps, t) ||^2, or with weight
        "min_snr" each example's term weighted by loss_weights (Min-SNR-gamma).
        x0: (B, C, H, W) in [-1, 1]; y: (B,) labels for a class-conditional model, else None;
        t, noise: drawn here (draw_t_and_noise) unless given. Returns the per-example loss, (B,)."""
        if t is None:
            t, noise = self.draw_t_and_noise(x0.shape, x0.device, x0.dtype, generator)
        xt = self.q_sample(x0, t, noise)
        eps = model(xt, t) if y is None else model(xt, t, y)
        loss = (noise - eps.float()).pow(2).mean(dim=(1, 2, 3))
        w = self.loss_weights(t, weight, gamma)
        return loss if w is None else loss * w

    # ---- the variational bound (eq. 5), in bits per dimension ----------------------------
    def prior_bpd(self, x0):
        """L_T = KL(q(x_T | x_0) || N(0, I)) per image, in bits/dim. (B,)"""
        t = torch.full((x0.shape[0],), self.T - 1, device=x0.device, dtype=torch.long)
        mean, var = self.q_mean_variance(x0, t)
        kl = normal_kl(mean, torch.log(var), torch.zeros_like(mean), torch.zeros_like(mean))
        return kl.flatten(1).mean(1) / math.log(2.0)

    def vb_term_bpd(self, model, x0, t, noise, clip_denoised=True):
        """The bound's term at (0-indexed) t, per image, in bits/dim. (B,)

        t >= 1: L_{t} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) (the paper's L_{t-1} at its t+1);
        t == 0: L_0 = -log p_theta(x_0 | x_1) with the discretised decoder.
        x_t is drawn from q(x_t | x_0) with the given noise.
        """
        xt = self.q_sample(x0, t, noise)
        true_mean, _ = self.q_posterior_mean_variance(x0, xt, t)
        true_logvar = extract(self.posterior_log_variance_clipped, t, xt.shape)
        mean, var, _ = self.p_mean_variance(model, xt, t, clip_denoised)
        kl = normal_kl(true_mean, true_logvar, mean, torch.log(var)).flatten(1).mean(1)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * torch.log(var)).flatten(1).mean(1)
        return torch.where(t == 0, nll, kl) / math.log(2.0)

    # ---- reverse process: one step of each sampler ------------------------------------------------
    def predict_x0(self, model, xt, t, clip_denoised=True):
        """x_0 implied by the network's eps_theta(x_t, t) (eq. 4 inverted); with clip_denoised it is
        clipped to the data range [-1, 1] (authors' code, default on), which keeps rare samples
        from blowing up to saturated squares."""
        x0 = self.predict_x0_from_eps(xt, t, model(xt, t).float())
        return x0.clamp(-1.0, 1.0) if clip_denoised else x0

    def p_mean_variance(self, model, xt, t, clip_denoised=True):
        """Mean and variance of p_theta(x_{t-1} | x_t) (section 3.2).

        The mean is mu_theta = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alphabar_t) eps_theta)
        (eq. 11). We compute it, as the authors' code does, as the posterior mean of eq. 7 at the
        predicted x_0, which is algebraically identical without clipping. Returns (mean, sigma_t^2, x_0).
        """
        x0 = self.predict_x0(model, xt, t, clip_denoised)
        mean, _ = self.q_posterior_mean_variance(x0, xt, t)
        return mean, extract(self.model_variance, t, xt.shape), x0

    def p_sample(self, model, xt, t, generator=None, clip_denoised=True):
        """One step of Algorithm 2 (line 4): x_{t-1} = mu_theta(x_t, t) + sigma_t z, z ~ N(0, I),
        with z = 0 at the last step (the paper's t = 1)."""
        mean, var, _ = self.p_mean_variance(model, xt, t, clip_denoised)
        z = draw_noise(xt.shape, generator, xt.device)
        return mean + bcast(t != 0, xt.dim()) * var.sqrt() * z

    def ddim_mean_variance(self, model, xt, t, t_prev, eta=0.0, clip_denoised=True):
        """Mean and variance of one DDIM step x_t -> x_{t_prev} (DDIM eq. 12, Song et al. 2021):
        x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps_hat + sigma z, with
        sigma^2 = eta^2 (1 - ab_prev) / (1 - ab_t) (1 - ab_t / ab_prev) (DDIM eq. 16).
        t_prev = -1 means x_0 (ab = 1). eta = 1 with consecutive steps is the ancestral sampler
        with sigma_t^2 = beta-tilde_t."""
        x0 = self.predict_x0(model, xt, t, clip_denoised)
        # With eps re-derived from the (clipped) x0, eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab), the mean is
        # a combination of x0 and x_t whose coefficients are computed in float64 (1 - ab/ab_prev cancels).
        ab = self.alphas_cumprod.to(t.device)[t]
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod]).to(t.device)[t_prev + 1]
        var = eta ** 2 * (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
        c_eps = (1 - ab_prev - var).clamp(min=0).sqrt() / (1 - ab).sqrt()
        c_x0, c_xt = ab_prev.sqrt() - c_eps * ab.sqrt(), c_eps
        return bcast(c_x0, xt.dim()) * x0 + bcast(c_xt, xt.dim()) * xt, bcast(var, xt.dim())

    def ddim_step(self, model, xt, t, t_prev, generator, clip_denoised, eta):
        """x_t -> x_{t_prev} by DDIM; noise is drawn only when eta > 0 (eta = 0: deterministic)."""
        mean, var = self.ddim_mean_variance(model, xt, t, t.new_full(t.shape, t_prev), eta, clip_denoised)
        if eta == 0:
            return mean
        return mean + var.sqrt() * draw_noise(xt.shape, generator, xt.device)

    def alpha_sigma_lambda(self, t):
        """(alpha_t, sigma_t, lambda_t) of a 0-indexed timestep t (an int) as float64 numbers: alpha_t =
        sqrt(alphabar_t), sigma_t = sqrt(1 - alphabar_t), the log-SNR lambda_t = log(alpha_t / sigma_t)
        (Lu et al. 2022, section 2). t = -1 is x_0: (1, 0, inf)."""
        if t < 0:
            return 1.0, 0.0, math.inf
        ab = float(self.alphas_cumprod[t])
        return math.sqrt(ab), math.sqrt(1.0 - ab), 0.5 * math.log(ab / (1.0 - ab))

    def dpmpp_2m_step(self, model, xt, t, t_prev, state, clip_denoised=True, sde=False, generator=None):
        """x_t -> x_{t_prev} by DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2: data prediction,
        multistep, second order), or with sde=True by SDE-DPM-Solver++(2M) (their section 5; the
        "midpoint" form of k-diffusion's sample_dpmpp_2m_sde). With h = lambda_{t_prev} - lambda_t:
            ODE: x = (sigma_prev / sigma_t) x_t + alpha_prev (1 - e^-h) D
            SDE: x = (sigma_prev / sigma_t) e^-h x_t + alpha_prev (1 - e^-2h) D + sigma_prev sqrt(1 - e^-2h) z
        where D is the x_0 prediction, corrected with the previous step's prediction by (1 / 2r)
        (x0 - x0_prev), r = h_prev / h (first order on the first step: then the ODE step is DDIM with
        eta 0, and the SDE step between consecutive timesteps is Algorithm 2 with sigma^2 = beta-tilde).
        The step to x_0 (t_prev = -1, sigma = 0) returns the x_0 prediction. state: the previous step's
        x_0 prediction and h."""
        x0 = self.predict_x0(model, xt, t, clip_denoised)
        if t_prev < 0:
            return x0
        a_s, s_s, lam_s = self.alpha_sigma_lambda(int(t[0]))
        a_t, s_t, lam_t = self.alpha_sigma_lambda(t_prev)
        h = lam_t - lam_s
        if sde:
            x = (s_t / s_s * math.exp(-h)) * xt + (a_t * -math.expm1(-2 * h)) * x0
            correction = 0.5 * a_t * -math.expm1(-2 * h)
        else:
            x = (s_t / s_s) * xt + (a_t * -math.expm1(-h)) * x0
            correction = 0.5 * a_t * -math.expm1(-h)
        if state.get("x0") is not None:
            x = x + (correction * h / state["h"]) * (x0 - state["x0"])  # (1 / r) with r = h_prev / h
        if sde:
            x = x + (s_t * math.sqrt(-math.expm1(-2 * h))) * draw_noise(xt.shape, generator, xt.device)
        state.update(x0=x0, h=h)
        return x

    # ---- reverse process: the loop the samplers share ----------------------------------------------
    SPACINGS = ("uniform", "quadratic", "logsnr", "karras")

    def ddim_timesteps(self, S, spacing="uniform"):
        """S increasing 0-indexed timesteps from 0 to T-1 at which a few-step sampler calls the network:
            uniform    evenly spaced in t (DDIM's "linear" spacing, here from 0 to T-1);
            quadratic  t_i = (i / (S-1))^2 (T-1), denser near t = 0. The DDIM paper's CIFAR-10 spacing;
                       its code takes linspace(0, sqrt(0.8 T), S)^2 truncated to int, which stops near
                       t = 800 and repeats t = 0 for 50 steps. Here it ends at T-1 and never repeats;
            logsnr     evenly spaced in the log-SNR lambda_t (Lu et al. 2022, DPM-Solver's "logSNR"
                       spacing, their choice for pixel-space models);
            karras     sigma_t = sqrt((1 - ab_t) / ab_t) spaced as in Karras et al. 2022, eq. 5, rho = 7.
        logsnr and karras span lambda from lambda_0 down to max(lambda_T, LAMBDA_MIN); t = T-1 is always
        the first step.
        The schedule is discrete, so each target is rounded to the nearest timestep (nearest in
        lambda for logsnr and karras); where rounding gives the same t twice, the later one moves up
        to the next free timestep (and, near T-1, the earlier ones down), so S steps always give S
        distinct timesteps.
        """
        if not 1 <= S <= self.T:
            raise ValueError(f"sampling steps must be in [1, {self.T}], got {S}")
        if spacing not in self.SPACINGS:
            raise ValueError(f"spacing must be one of {', '.join(self.SPACINGS)}, got {spacing!r}")
        if S == 1:  # a single step must start from x_T
            return torch.tensor([self.T - 1])
        u = torch.linspace(0, 1, S, dtype=torch.float64)
        if spacing == "uniform":  # written as linspace(0, T-1): its rounding of exact halves is the one kept
            ts = torch.linspace(0, self.T - 1, S, dtype=torch.float64).round().long()
        elif spacing == "quadratic":
            ts = (torch.linspace(0, math.sqrt(self.T - 1), S, dtype=torch.float64) ** 2).round().long()
        else:
            ab = self.alphas_cumprod
            lam = 0.5 * torch.log(ab / (1 - ab))  # decreasing in t
            lam_T = max(float(lam[-1]), LAMBDA_MIN)  # the cosine schedule's last steps carry no signal
            if spacing == "logsnr":
                target = lam[0] + u * (lam_T - lam[0])
            else:
                rho, sig = 7.0, ((1 - ab) / ab).sqrt()
                sig_T = math.exp(-lam_T)
                sig_i = (sig[0] ** (1 / rho) + u * (sig_T ** (1 / rho) - sig[0] ** (1 / rho))) ** rho
                target = -torch.log(sig_i)  # lambda = -log sigma
            ts = (lam[None, :] - target[:, None]).abs().argmin(1)
        ts = ts.tolist()
        for i in range(1, S):  # distinct and increasing: move a repeated t up ...
            ts[i] = max(ts[i], ts[i - 1] + 1)
        ts[-1] = self.T - 1
        for i in range(S - 2, -1, -1):  # ... and, where that ran past T-1, the ones below it down
            ts[i] = min(ts[i], ts[i + 1] - 1)
        return torch.tensor(ts)

    @staticmethod
    def descending(timesteps):
        """The (t, t_next) pairs that visit increasing `timesteps` from the last down to x_0 (t_next = -1)."""
        return list(zip(timesteps, [-1] + list(timesteps[:-1])))[::-1]

    @torch.no_grad()
    def reverse_loop(self, step, model, shape, pairs, generator=None, device="cpu", return_steps=(),
                     progress=True, desc="sampling"):
        """The skeleton of every sampler: x_T ~ N(0, I), then x <- step(model, x, t, t_next, generator, state)
        for each (t, t_next) of `pairs` in order (0-indexed timesteps; `descending` makes them from a
        grid; t_next = -1 is x_0; t_next > t is a restart's jump back up). `state` is a dict the loop
        hands to every step: multistep solvers keep their history in it.

        return_steps: the paper's t in {0, ..., T} whose x_t are returned: T is the initial noise x_T,
        0 the final sample x_0; a step from t down to t_next gives the x_k for t_next < k <= t (the
        nearest visited timestep; the last visit wins). Returns (x_0, {t: x_t}).
        """
        x = draw_noise(shape, generator, device)
        keep = set(return_steps)
        steps = {self.T: x.clone()} if self.T in keep else {}
        state = {}
        for t_cur, t_next in tqdm(pairs, desc=desc, disable=not progress, leave=False):
            t = torch.full((shape[0],), t_cur, device=device, dtype=torch.long)
            x = step(model, x, t, t_next, generator, state)
            for k in [k for k in keep if t_next < k <= t_cur and k != self.T]:
                steps[k] = x.clone()
        return x, steps

    def p_sample_loop(self, model, shape, generator=None, device="cpu", clip_denoised=True, return_steps=(),
                      progress=True):
        """Algorithm 2: x_T ~ N(0, I), then all T reverse steps (p_sample) down to x_0."""
        def step(model, x, t, t_prev, generator, state):  # consecutive steps: t_prev = t - 1
            return self.p_sample(model, x, t, generator, clip_denoised)
        pairs = self.descending(list(range(self.T)))
        return self.reverse_loop(step, model, shape, pairs, generator, device, return_steps, progress, "sampling")

    def ddim_sample_loop(self, model, shape, sampling_steps, generator=None, device="cpu", clip_denoised=True,
                         return_steps=(), progress=True, eta=0.0, spacing="uniform"):
        """DDIM sampling over `sampling_steps` timesteps (ddim_timesteps); eta = 0 is deterministic
        given x_T. Same return value as p_sample_loop."""
        def step(model, x, t, t_prev, generator, state):
            return self.ddim_step(model, x, t, t_prev, generator, clip_denoised, eta)
        pairs = self.descending(self.ddim_timesteps(sampling_steps, spacing).tolist())
        return self.reverse_loop(step, model, shape, pairs, generator, device, return_steps, progress,
                                 "sampling (ddim)")

    def dpmpp_sample_loop(self, model, shape, sampling_steps, generator=None, device="cpu", clip_denoised=True,
                          return_steps=(), progress=True, spacing="logsnr", sde=False):
        """DPM-Solver++(2M) over `sampling_steps` timesteps (one network evaluation each), or with
        sde=True its stochastic form. Same return value as p_sample_loop."""
        def step(model, x, t, t_prev, generator, state):
            return self.dpmpp_2m_step(model, x, t, t_prev, state, clip_denoised, sde, generator)
        pairs = self.descending(self.ddim_timesteps(sampling_steps, spacing).tolist())
        return self.reverse_loop(step, model, shape, pairs, generator, device, return_steps, progress,
                                 "sampling (dpm++2m" + "-sde" * sde + ")")

    # ---- Restart sampling (Xu et al. 2023) ----------------------------------------------------------
    def renoise(self, x, t, t_up, generator=None):
        """x_t -> x_{t_up}, t_up > t, by the forward process itself: q(x_{t_up} | x_t) =
        N(sqrt(ab_up / ab_t) x_t, (1 - ab_up / ab_t) I) (eq. 4 between two noise levels, composed
        from the forward steps of eq. 2). Restart's "forward noise" step; no network evaluation."""
        r = float(self.alphas_cumprod[t_up] / self.alphas_cumprod[t])
        return math.sqrt(r) * x + math.sqrt(1.0 - r) * draw_noise(x.shape, generator, x.device)

    def lambda_grid(self, t_lo, t_hi, n):
        """n + 1 distinct timesteps from t_lo up to t_hi (t_hi - t_lo >= n), evenly spaced in the log-SNR."""
        lam = 0.5 * torch.log(self.alphas_cumprod / (1 - self.alphas_cumprod))
        target = lam[t_lo] + torch.linspace(0, 1, n + 1, dtype=torch.float64) * (lam[t_hi] - lam[t_lo])
        ts = (lam[None, t_lo:t_hi + 1] - target[:, None]).abs().argmin(1).add(t_lo).tolist()
        for i in range(1, n + 1):  # distinct, as in ddim_timesteps
            ts[i] = max(ts[i], ts[i - 1] + 1)
        ts[-1] = t_hi
        for i in range(n - 1, -1, -1):
            ts[i] = min(ts[i], ts[i + 1] - 1)
        return ts

    def restart_pairs(self, S, spacing="logsnr", sigma_min=0.06, sigma_max=0.30, times=1, share=0.2):
        """The steps of Restart sampling (Xu et al. 2023, Algorithm 1) in S solver steps: an ODE path over
        S - times * n steps (n = floor(share * S / times) per restart), and on reaching the interval's lower
        end t_min, `times` restarts: jump back up to t_max with the forward process (renoise), then n
        ODE steps down to t_min again. The interval [t_min, t_max] is the paper's for CIFAR-10 under
        the VP model, sigma = sqrt((1 - ab) / ab) in [0.06, 0.30] (t = 14 to 88 here; MNIST shares the
        [-1, 1] pixel range), t_min moved to the nearest timestep of the main grid. One restart with a
        fifth of the steps is our choice: restarts of a single (first-order) step across that interval
        narrow Gaussian data's std from 0.20 to 0.13-0.14 at S = 10 (tests/test_samplers.py). Below
        n = 2 there is no restart: the plain ODE path. Returns the (t, t_next) pairs of reverse_loop."""
        n = int(share * S / times) if times else 0
        n, times = (n, times) if n >= 2 else (0, 0)
        main = self.ddim_timesteps(S - times * n, spacing).tolist()
        pairs = self.descending(main)
        if not times:
            return pairs
        lam = 0.5 * torch.log(self.alphas_cumprod / (1 - self.alphas_cumprod))
        t_min = min(main, key=lambda t: abs(float(lam[t]) + math.log(sigma_min)))  # lambda = -log sigma
        t_max = max(int((lam + math.log(sigma_max)).abs().argmin()), t_min + n)
        down = self.descending(self.lambda_grid(t_min, t_max, n))[:-1]  # t_max -> ... -> t_min
        i = [k for k, (_, t_next) in enumerate(pairs) if t_next == t_min][0] + 1
        return pairs[:i] + times * ([(t_min, t_max)] + down) + pairs[i:]

    def restart_sample_loop(self, model, shape, sampling_steps, generator=None, device="cpu", clip_denoised=True,
                            return_steps=(), progress=True, spacing="logsnr", **restart):
        """Restart sampling with DPM-Solver++(2M) as its ODE solver (the paper uses Heun's, two network
        evaluations a step; 2M takes one): `sampling_steps` network evaluations in all (restart_pairs).
        After a jump the solver starts afresh (its first step is first order). Same return value as
        p_sample_loop."""
        def step(model, x, t, t_next, generator, state):
            if t_next > int(t[0]):  # a restart: back up the forward process; the multistep history is void
                state.clear()
                return self.renoise(x, int(t[0]), t_next, generator)
            return self.dpmpp_2m_step(model, x, t, t_next, state, clip_denoised, False, generator)
        pairs = self.restart_pairs(sampling_steps, spacing, **restart)
        return self.reverse_loop(step, model, shape, pairs, generator, device, return_steps, progress,
                                 "sampling (restart)")
