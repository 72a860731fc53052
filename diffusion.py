"""The diffusion math of Ho, Jain, Abbeel 2020 ("DDPM"), in one place; the network is an argument.

Notation follows the paper: beta_t, alpha_t = 1 - beta_t, alphabar_t = prod_{s<=t} alpha_s.
Timesteps are 0-indexed here: t in {0, ..., T-1} is the paper's t+1 in {1, ..., T}.
The schedule is computed in float64 on the CPU and cast to float32 only when it meets a batch (`bcast`).
Each device gets its copy once (`GaussianDiffusion.on`), so a step never copies it host-to-device.
Data live in [-1, 1] (paper section 3.3): `to_model_range` / `from_model_range` are the only
place where pixels are scaled.

Where to find the paper here (equation numbers are the DDPM paper's unless another paper is named):
    section 4     the linear schedule; cosine_betas: eq. 17 of Nichol & Dhariwal 2021   linear_betas
    eq. 4         q(x_t | x_0), the forward process in closed form   q_mean_variance, q_sample
    eqs. 6-7      the posterior q(x_{t-1} | x_t, x_0)                 q_posterior_mean_variance
    section 3.2   sigma_t^2 = beta_t or beta-tilde_t                  GaussianDiffusion(var_type=...)
    Algorithm 1   training: eqs. 12, 14, the eps loss and L_simple    training_losses (the loop: train.py)
                  Min-SNR-gamma weighting (Hang et al. 2023)         loss_weights
                  v-prediction (Salimans & Ho 2022, section 4 and    GaussianDiffusion(prediction="v"):
                  appendix D), not the paper's: the network          training_losses' target v, eps_theta
                  predicts v = sqrt(ab_t) eps - sqrt(1 - ab_t) x_0   (the one place its output becomes eps)
    eq. 11        the mean mu_theta(x_t, t) from eps_theta           p_mean_eq11
    Algorithm 2   sampling: one step                                  p_sample (the loop: samplers.sample_ddpm)
    eq. 5         the variational bound L_T + sum L_{t-1} + L_0       prior_bpd, vb_term_bpd
    eq. 13        the discrete decoder p_theta(x_0 | x_1)             discretized_gaussian_log_likelihood
The faster samplers of later papers (DDIM, DPM-Solver++, Restart) are in samplers.py; the chain of some of
the timesteps (respacing, Nichol & Dhariwal 2021) is respace.py's GaussianDiffusion.
"""
import math
from types import SimpleNamespace

import torch


def to_model_range(x01):
    """Images in [0, 1] -> [-1, 1], the range the reverse process is defined on."""
    return x01 * 2.0 - 1.0


def from_model_range(x):
    """[-1, 1] -> [0, 1], clamped."""
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


def to_uint8(x):
    """[-1, 1] float batch (B, 1, H, W) -> uint8 (B, H, W), rounding to the nearest pixel value."""
    return (from_model_range(x) * 255.0).round().to(torch.uint8)[:, 0]


def bcast(c, x):
    """Per-example coefficients (B,) or one for all () (float64 schedule values, or a mask) on x's device
    -> float32 (B or 1, 1, ..., 1), broadcasting over the batch x. The one place where broadcasting
    happens: every formula computes its coefficients in float64 and casts them here."""
    return c.float().reshape(-1, *([1] * (x.dim() - 1)))


def extract(arr, t, x):
    """arr[t] of a schedule array on t's device (GaussianDiffusion.on) for a batch of timesteps t (B,),
    as float32 (B, 1, 1, 1) for x."""
    return bcast(arr[t], x)


def schedule_dtype(device):
    """The dtype of the schedule's copy on `device`: float64, except on Apple's MPS, which has no float64:
    there the float64 values are cast to float32 on the CPU first. Either way a coefficient reaches the
    batch as float64 rounded once to float32, so the CPU, CUDA and MPS use the same numbers."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


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
VAR_TYPES = ("fixed_large", "fixed_small")
LOSS_WEIGHTS = ("none", "min_snr")
PREDICTIONS = ("eps", "v")


class GaussianDiffusion:
    """The forward process q, the L_simple loss and the ancestral sampler of Algorithm 2.

    var_type: the reverse-process variance sigma_t^2 (section 3.2): "fixed_large" = beta_t
    (the paper's CIFAR-10 setting, our default) or "fixed_small" = beta-tilde_t (eq. 7).
    schedule: "linear" (the paper's, from beta_start to beta_end) or "cosine" (Nichol & Dhariwal
    2021; beta_start and beta_end are then unused). Everything below is computed from the betas,
    so the samplers and the variational bound hold for either.
    prediction: what the network outputs: "eps" (the paper's eps_theta) or "v" (Salimans & Ho 2022,
    appendix D), v = sqrt(ab_t) eps - sqrt(1 - ab_t) x_0, whose size stays near 1 at every noise level.
    Only training_losses (its target) and eps_theta (the output as eps) read it: the reverse process,
    the samplers and the bound take eps_theta(net), so they hold for either.
    """

    def __init__(self, T=1000, beta_start=1e-4, beta_end=0.02, var_type="fixed_large", schedule="linear",
                 prediction="eps"):
        if var_type not in VAR_TYPES:
            raise ValueError(f"var_type must be fixed_large or fixed_small, got {var_type!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be linear or cosine, got {schedule!r}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be eps or v, got {prediction!r}")
        self.args = dict(T=T, beta_start=beta_start, beta_end=beta_end, var_type=var_type, schedule=schedule,
                         prediction=prediction)
        b = linear_betas(T, beta_start, beta_end) if schedule == "linear" else cosine_betas(T)
        self.set_schedule(b, torch.cumprod(1.0 - b, 0), var_type, prediction)

    def set_schedule(self, b, alphas_cumprod, var_type, prediction):
        """Every coefficient below, from the betas b and alphabar_t = prod_{s<=t} (1 - beta_s). alphabar is an
        argument so that respace.SpacedDiffusion, the chain of some of these timesteps, keeps their alphabar_t
        as they are (its product of its own betas would differ in the last bits)."""
        self.T, self.var_type, self.prediction = len(b), var_type, prediction
        assert ((b > 0) & (b <= 1)).all(), "betas must lie in (0, 1]"
        self.betas, self.alphas, self.alphas_cumprod = b, 1.0 - b, alphas_cumprod
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)  # SNR_t = ab_t / (1 - ab_t)
        # eq. 11's coefficients: 1 / sqrt(alpha_t) and beta_t / sqrt(1 - alphabar_t)
        self.recip_sqrt_alphas = 1.0 / self.alphas.sqrt()
        self.eps_coef_eq11 = b / (1.0 - self.alphas_cumprod).sqrt()
        # Posterior q(x_{t-1} | x_t, x_0) = N(mean, beta-tilde_t I), eqs. 6-7.
        self.posterior_variance = b * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta-tilde_0 = 0; clip the log as the authors' code does, so fixed_small stays finite (a chain of
        # one step, respace.py's, has no beta-tilde_1: its 0 stays, and its one step adds no noise).
        pv_1 = self.posterior_variance[1:2] if self.T > 1 else self.posterior_variance[:1]
        self.posterior_log_variance_clipped = torch.log(torch.cat([pv_1, self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = b * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1.0 - self.alphas_cumprod)
        # sigma_t^2 of the reverse process. At the paper's t = 1 (our index 0) both choices use
        # beta-tilde_1, as the authors' code does, so the decoder's variance is not 0
        # (beta-tilde is 0 there; the sampler adds no noise at that step either way).
        if var_type == "fixed_large":
            self.model_variance = torch.cat([pv_1, b[1:]])
        else:
            self.model_variance = torch.exp(self.posterior_log_variance_clipped)
        self._on = {}

    def on(self, device):
        """The schedule's arrays (every tensor attribute) on `device`, copied there once and cached, in
        schedule_dtype(device) (on the CPU: the float64 arrays themselves, not copies). Formulas read their
        coefficients from here, so a training or sampling step never waits for a host-to-device copy."""
        device = torch.device(device)
        if device not in self._on:
            dtype = schedule_dtype(device)
            self._on[device] = SimpleNamespace(**{k: v.to(dtype).to(device) for k, v in vars(self).items()
                                                  if isinstance(v, torch.Tensor)})
        return self._on[device]

    # ---- forward process --------------------------------------------------------------
    def q_mean_variance(self, x0, t):
        """q(x_t | x_0) = N(sqrt(alphabar_t) x_0, (1 - alphabar_t) I), eq. 4."""
        s = self.on(t.device)
        return extract(s.sqrt_alphas_cumprod, t, x0) * x0, extract(s.one_minus_alphas_cumprod, t, x0)

    def q_sample(self, x0, t, noise):
        """Draw x_t ~ q(x_t | x_0) by reparameterisation (eq. 4)."""
        s = self.on(t.device)
        return extract(s.sqrt_alphas_cumprod, t, x0) * x0 + extract(s.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def q_posterior_mean_variance(self, x0, xt, t):
        """Mean and variance of q(x_{t-1} | x_t, x_0), eqs. 6-7."""
        s = self.on(t.device)
        mean = extract(s.posterior_mean_coef1, t, xt) * x0 + extract(s.posterior_mean_coef2, t, xt) * xt
        return mean, extract(s.posterior_variance, t, xt)

    # ---- reverse process: Algorithm 2 -------------------------------------------------------
    def eps_theta(self, net):
        """The network as eps_theta(x_t, t), the noise predictor that the reverse process, the samplers and the
        bound take: `net` itself for prediction "eps" (the paper's); for "v" its output turned into eps,
        eps = sqrt(ab_t) v + sqrt(1 - ab_t) x_t (Salimans & Ho 2022, appendix D, from x_t = sqrt(ab_t) x_0
        + sqrt(1 - ab_t) eps and v's definition), in float32 like predict_x0. The one place where the
        network's output becomes eps: guidance (linear, its weights sum to 1) acts alike on v and eps,
        epsilon scaling acts on this eps (samplers.Denoiser). predict_x0 divides this eps's float32 rounding
        by sqrt(ab_t): x_0 is then off by at most 2e-4 from sqrt(ab_t) x_t - sqrt(1 - ab_t) v, but for 5e-3 at
        the cosine schedule's t = T-1 (ab = 2e-9), where the network's own error in v reaches x_0 undivided."""
        if self.prediction == "eps":
            return net

        def eps(xt, t):
            v, s = net(xt, t).float(), self.on(t.device)
            return extract(s.sqrt_alphas_cumprod, t, xt) * v + extract(s.sqrt_one_minus_alphas_cumprod, t, xt) * xt
        return eps

    def predict_x0(self, eps_fn, xt, t, clip=True):
        """The x_0 that eps_theta(x_t, t) implies (eps_fn: eps_theta, see eps_theta), inverting eq. 4:
        x_0 = (x_t - sqrt(1 - alphabar_t) eps) / sqrt(alphabar_t); with `clip` clipped to the data range
        [-1, 1] (authors' code, default on), which keeps rare samples from blowing up to saturated squares."""
        eps, s = eps_fn(xt, t).float(), self.on(t.device)
        x0 = extract(s.sqrt_recip_alphas_cumprod, t, xt) * xt - extract(s.sqrt_recipm1_alphas_cumprod, t, xt) * eps
        return x0.clamp(-1.0, 1.0) if clip else x0

    def p_mean_eq11(self, eps, xt, t):
        """mu_theta(x_t, t) = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alphabar_t) eps_theta), eq. 11, as the
        paper writes it. p_sample computes the same mean as the posterior mean (eq. 7) at the predicted
        x_0, as the authors' code does, which lets x_0 be clipped; without clipping the two are
        identical (tests/test_diffusion.py)."""
        s = self.on(t.device)
        return extract(s.recip_sqrt_alphas, t, xt) * (xt - extract(s.eps_coef_eq11, t, xt) * eps)

    def p_sample(self, eps_fn, xt, t, z, clip=True):
        """Algorithm 2, lines 3-4: x_{t-1} = mu_theta(x_t, t) + sigma_t z, with z = 0 at the last step (the
        paper's t = 1). mu_theta is eq. 11's mean computed as q's posterior mean (eq. 7) at x_0 predicted
        from eps_theta (eps_fn; p_mean_eq11 says why); sigma_t^2 is beta_t or beta-tilde_t (var_type).
        t: (B,) timesteps; z: N(0, I) noise like x_t. samplers.sample_ddpm runs the loop (lines 1-2, 5-6), and
        samplers.sample_ddpm_respaced on a chain of fewer steps (respace.SpacedDiffusion)."""
        x0 = self.predict_x0(eps_fn, xt, t, clip)
        mean, _ = self.q_posterior_mean_variance(x0, xt, t)
        return mean + bcast(t != 0, xt) * extract(self.on(t.device).model_variance, t, xt).sqrt() * z

    # ---- training -----------------------------------------------------------------------
    def draw_t_and_noise(self, shape, device, dtype=torch.float32, generator=None):
        """t uniform in {0, ..., T-1} (the paper's {1, ..., T}), (B,), and eps ~ N(0, I) of `shape`."""
        t = torch.randint(0, self.T, (shape[0],), device=device, generator=generator)
        return t, torch.randn(shape, device=device, dtype=dtype, generator=generator)

    def loss_weights(self, t, kind="none", gamma=5.0):
        """Per-example weights of the eps- (or v-) prediction loss, (B,) float32, or None for "none" (L_simple).
        "min_snr": Min-SNR-gamma (Hang et al. 2023): the x_0 loss weighted by min(SNR_t, gamma), which
        for eps-prediction is min(SNR_t, gamma) / SNR_t with SNR_t = ab_t / (1 - ab_t): the many easy,
        low-noise timesteps (SNR up to 1e4 here) stop dominating the gradient. For v-prediction it is
        min(SNR_t, gamma) / (SNR_t + 1) (their section 3.4): ||x_0 - x0_theta||^2 = (1 - ab_t) ||v - v_theta||^2."""
        if kind == "none":
            return None
        if kind != "min_snr":
            raise ValueError(f"loss weight must be one of {', '.join(LOSS_WEIGHTS)}, got {kind!r}")
        snr = self.on(t.device).snr[t]
        return (snr.clamp(max=gamma) / (snr if self.prediction == "eps" else snr + 1.0)).float()

    def training_losses(self, model, x0, generator=None, y=None, t=None, noise=None, weight="none", gamma=5.0):
        """Algorithm 1, lines 2-5: L_simple (eq. 14), the loss of eq. 12 without its weight:
        E_{t, eps} || eps - eps_theta(sqrt(ab_t) x0 + sqrt(1-ab_t) eps, t) ||^2, or with weight
        "min_snr" each example's term weighted by loss_weights (Min-SNR-gamma). With prediction "v" the
        target is v = sqrt(ab_t) eps - sqrt(1 - ab_t) x0 instead of eps (Salimans & Ho 2022, appendix D).
        x0: (B, C, H, W) in [-1, 1]; y: (B,) labels for a class-conditional model, else None;
        t, noise: drawn here (draw_t_and_noise) unless given. Returns the per-example loss, (B,)."""
        if t is None:
            t, noise = self.draw_t_and_noise(x0.shape, x0.device, x0.dtype, generator)
        xt = self.q_sample(x0, t, noise)
        out = model(xt, t) if y is None else model(xt, t, y)
        target = noise if self.prediction == "eps" else self.v_target(x0, t, noise)
        loss = (target - out.float()).pow(2).mean(dim=(1, 2, 3))
        w = self.loss_weights(t, weight, gamma)
        return loss if w is None else loss * w

    def v_target(self, x0, t, noise):
        """v = sqrt(ab_t) eps - sqrt(1 - ab_t) x_0 (Salimans & Ho 2022, appendix D), the target of prediction "v"."""
        s = self.on(t.device)
        return extract(s.sqrt_alphas_cumprod, t, x0) * noise - extract(s.sqrt_one_minus_alphas_cumprod, t, x0) * x0

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
        x_t is drawn from q(x_t | x_0) with the given noise; model: the network (its output is eps or v).
        """
        xt = self.q_sample(x0, t, noise)
        true_mean, _ = self.q_posterior_mean_variance(x0, xt, t)
        s = self.on(t.device)
        true_logvar = extract(s.posterior_log_variance_clipped, t, xt)
        mean, _ = self.q_posterior_mean_variance(self.predict_x0(self.eps_theta(model), xt, t, clip_denoised), xt, t)
        var = extract(s.model_variance, t, xt)  # p_theta(x_{t-1} | x_t) = N(mean, sigma_t^2), as p_sample
        kl = normal_kl(true_mean, true_logvar, mean, torch.log(var)).flatten(1).mean(1)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * torch.log(var)).flatten(1).mean(1)
        return torch.where(t == 0, nll, kl) / math.log(2.0)
