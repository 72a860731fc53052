"""Sampling: the 1000-step ancestral reverse process (Algorithm 2 of Ho et al. 2020), or a few-step
sampler (DDIM, Song et al. 2021; DPM-Solver++(2M) and its SDE form, Lu et al. 2022; Restart sampling,
Xu et al. 2023), from the same trained model."""
import math
import weakref

import torch

from config import DDIM_STEPS, DEFAULT_SPACING, SAMPLERS
from diffusion import GaussianDiffusion, SampleNoise
from utils import UserError, autocast


def sampler_kwargs(args, T):
    """Checked sampler settings from parsed flags (config.add_sampler_flags) for a diffusion of T
    steps; none is accepted and silently ignored."""
    if args.sampler == "ddpm":
        if args.sampling_steps not in (None, T) or args.eta is not None or args.spacing is not None:
            raise UserError("--sampling_steps, --eta and --spacing are for the few-step samplers (--sampler ddim, "
                            "dpm++2m, dpm++2m-sde or restart); "
                            f"the ddpm sampler always takes all T={T} steps")
        return {"sampler": "ddpm"}
    if args.eta is not None and args.sampler != "ddim":
        raise UserError(f"--eta is for --sampler ddim; {args.sampler} has none")
    if args.eta is not None and args.eta < 0:
        raise UserError(f"--eta must be >= 0, got {args.eta}")
    steps = DDIM_STEPS if args.sampling_steps is None else args.sampling_steps
    spacing = args.spacing or DEFAULT_SPACING[args.sampler]
    try:
        d = GaussianDiffusion(T=T)
        d.restart_pairs(steps, spacing) if args.sampler == "restart" else d.ddim_timesteps(steps, spacing)
    except ValueError as e:
        raise UserError(f"--sampling_steps {steps}: {e}") from None
    kw = {"sampler": args.sampler, "sampling_steps": steps, "spacing": spacing}
    if args.sampler == "ddim":
        kw["eta"] = args.eta or 0.0
    return kw


def network_evaluations(skw, T, guidance_scale=0.0):
    """Network evaluations (NFE) per sample: one per step (T for ddpm, sampling_steps for the others),
    twice that under classifier-free guidance with w > 0 (two passes per step)."""
    steps = T if skw["sampler"] == "ddpm" else skw["sampling_steps"]
    return steps * (2 if guidance_scale else 1)


def check_n_samples(n):
    if n < 1:
        raise UserError(f"--n_samples must be >= 1, got {n}")


def valid_guidance_scale(w):
    """A guidance scale w of eq. (6) in Ho & Salimans (2022) must be finite and >= 0."""
    return w >= 0 and math.isfinite(w)


def label_kwargs(args, num_classes, n_samples):
    """Checked --digits / --guidance_scale -> {"labels": (n_samples,) long or None, "guidance_scale": w}.

    For an unconditional model (num_classes None) both flags are refused. For a conditional one the
    digits are repeated to fill n_samples; 'none' asks for the null label (unconditional samples).
    """
    if num_classes is None:
        if args.digits is not None or args.guidance_scale is not None:
            raise UserError("--digits and --guidance_scale need a class-conditional checkpoint (trained with "
                            "--class_cond); this one is unconditional")
        return {"labels": None, "guidance_scale": 0.0}
    w = 0.0 if args.guidance_scale is None else args.guidance_scale
    if not valid_guidance_scale(w):
        raise UserError(f"--guidance_scale must be >= 0, got {args.guidance_scale}")
    spec = ("all" if args.digits is None else args.digits).strip().lower()
    if spec == "none":
        if w != 0:
            raise UserError("--guidance_scale needs digits to guide towards; drop it with --digits none")
        return {"labels": torch.full((n_samples,), num_classes, dtype=torch.long), "guidance_scale": 0.0}
    if spec == "all":
        digits = list(range(num_classes))
    else:
        try:
            digits = [int(v) for v in spec.split(",") if v.strip()]
        except ValueError:
            digits = []
        if not digits or any(not 0 <= d < num_classes for d in digits):
            raise UserError(f"--digits must be 'all', 'none' or comma-separated digits in 0..{num_classes - 1}, "
                            f"got {args.digits!r}")
    labels = torch.tensor(digits, dtype=torch.long).repeat((n_samples + len(digits) - 1) // len(digits))[:n_samples]
    return {"labels": labels, "guidance_scale": w}


def guided(net, y, w, null_label):
    """The network the samplers call, eps(x, t), for labels y under classifier-free guidance
    (Ho & Salimans 2022, eq. 6): eps = (1 + w) eps(x, y) - w eps(x, null). With w > 0 the
    conditional and the unconditional passes run as one batch of twice the size."""
    if y is None:
        return net
    if w == 0:
        return lambda x, t: net(x, t, y)
    y2 = torch.cat([y, torch.full_like(y, null_label)])

    def eps(x, t):
        e_cond, e_null = net(torch.cat([x, x]), torch.cat([t, t]), y2).float().chunk(2)  # fp32 even under autocast
        return (1.0 + w) * e_cond - w * e_null
    return eps


@torch.no_grad()
def sample_func(model, n_samples=10, diffusion=None, seed=0, generator=None, device=None,
                batch_size=256, return_steps=(), clip_denoised=True, progress=True,
                sampler="ddpm", sampling_steps=None, eta=0.0, spacing=None, amp="none", compile=False,
                labels=None, guidance_scale=0.0):
    """Draw `n_samples` images with Algorithm 2 (T reverse steps from pure noise), or a few-step sampler.

    labels: (n_samples,) class labels for a class-conditional model (its null label = unconditional),
    guided with weight `guidance_scale` (see guided); None for an unconditional model.

    sampler: "ddpm" (ancestral, T steps), or one of the few-step samplers over `sampling_steps` steps
    (default DDIM_STEPS) placed by `spacing` (default: the sampler's own, config.DEFAULT_SPACING):
    "ddim" (`eta` = 0 deterministic, 1 ancestral-like), "dpm++2m", "dpm++2m-sde", "restart".
    seed / generator: reproducibility. With a seed, sample i draws all its noise from its own stream
    (diffusion.SampleNoise), so it depends only on (seed, i): the same digits whatever batch_size,
    n_samples or device. A torch.Generator (on the model's device) is used as is instead, one stream
    for all samples (faster on a GPU, but the digits then depend on the batching).
    return_steps: the paper's t in {0, ..., T} whose x_t are kept (T = noise, 0 = the sample).
    Returns (samples, steps): samples (n_samples, C, H, W) in [-1, 1] on the CPU, and
    steps {t: (n_samples, C, H, W)} for the reverse-process figure.
    """
    check_n_samples(n_samples)
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    diffusion = diffusion or GaussianDiffusion()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    m = model.model_args
    shape = (m["in_channels"], m["resolution"], m["resolution"])
    null_label = getattr(model, "num_classes", None)
    if (labels is None) != (null_label is None):
        raise ValueError("labels are required by a class-conditional model and refused by an unconditional one")
    if labels is not None and len(labels) != n_samples:
        raise ValueError(f"need one label per sample: {len(labels)} labels for {n_samples} samples")
    samples, steps = [], {}
    net = _compiled(model, device) if compile else model
    try:
        for start in range(0, n_samples, batch_size):
            b = min(batch_size, n_samples - start)
            g = generator if generator is not None else SampleNoise(seed, range(start, start + b), device)
            kw = dict(generator=g, device=device, clip_denoised=clip_denoised, return_steps=return_steps,
                      progress=progress)
            with autocast(device, amp), _freezing(compile):
                y = None if labels is None else labels[start:start + b].to(device)
                x, st = _loop(diffusion, guided(net, y, guidance_scale, null_label), (b, *shape), kw,
                              sampler, sampling_steps, eta, spacing)
            samples.append(x.cpu())
            for t, xt in st.items():
                steps.setdefault(t, []).append(xt.cpu())
    finally:
        model.train(was_training)
    return torch.cat(samples), {t: torch.cat(v) for t, v in steps.items()}


_COMPILED = weakref.WeakKeyDictionary()  # model -> its compiled form, so repeated calls compile once


def _compiled(model, device):
    if model not in _COMPILED:
        if device.type == "cpu":
            model.to(memory_format=torch.channels_last)
        _COMPILED[model] = torch.compile(model, dynamic=False)  # freezing + dynamic shapes broke in inductor 2.14
    return _COMPILED[model]


def _freezing(on):
    """Inductor's freezing (weights folded in as constants) while compiling for inference."""
    import contextlib
    if not on:
        return contextlib.nullcontext()
    import torch._inductor.config as inductor_config
    return inductor_config.patch(freezing=True)


def _loop(diffusion, model, shape, kw, sampler, sampling_steps, eta, spacing):
    steps, spacing = sampling_steps or DDIM_STEPS, spacing or DEFAULT_SPACING.get(sampler)
    if sampler == "ddim":
        return diffusion.ddim_sample_loop(model, shape, sampling_steps=steps, eta=eta, spacing=spacing, **kw)
    if sampler in ("dpm++2m", "dpm++2m-sde"):
        return diffusion.dpmpp_sample_loop(model, shape, sampling_steps=steps, spacing=spacing,
                                           sde=sampler == "dpm++2m-sde", **kw)
    if sampler == "restart":
        return diffusion.restart_sample_loop(model, shape, sampling_steps=steps, spacing=spacing, **kw)
    return diffusion.p_sample_loop(model, shape, **kw)
