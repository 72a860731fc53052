"""Sampling: the 1000-step ancestral reverse process (Algorithm 2 of Ho et al. 2020), or DDIM
(Song et al. 2021) with fewer steps, from the same trained model."""
import weakref

import torch

from diffusion import GaussianDiffusion
from utils import UserError, autocast


def add_sampler_args(p):
    """The sampler and speed flags shared by run.py and evaluate.py."""
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"],
                   help="mixed precision (autocast; fp16 trains with a GradScaler)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"],
                   help="ddpm: the paper's T-step ancestral sampler; ddim: Song et al. 2021, fewer steps")
    p.add_argument("--sampling_steps", type=int, help="ddim: number of steps (default 50); ddpm always uses T")
    p.add_argument("--eta", type=float, default=0.0, help="ddim: 0 = deterministic, 1 = ancestral-like")
    p.add_argument("--spacing", default="uniform", choices=["uniform", "quadratic"], help="ddim timestep spacing")


def sampler_kwargs(args, T=1000):
    """Checked sampler settings from parsed flags; none is accepted and silently ignored."""
    if args.sampler == "ddpm":
        if args.sampling_steps not in (None, T) or args.eta != 0.0 or args.spacing != "uniform":
            raise UserError("--sampling_steps, --eta and --spacing are for --sampler ddim; "
                            f"the ddpm sampler always takes all T={T} steps")
        return {"sampler": "ddpm"}
    steps = 50 if args.sampling_steps is None else args.sampling_steps
    if not 1 <= steps <= T:
        raise UserError(f"--sampling_steps must be in [1, {T}], got {steps}")
    if args.eta < 0:
        raise UserError(f"--eta must be >= 0, got {args.eta}")
    try:
        GaussianDiffusion(T=T).ddim_timesteps(steps, args.spacing)
    except ValueError as e:
        raise UserError(str(e)) from None
    return {"sampler": "ddim", "sampling_steps": steps, "eta": args.eta, "spacing": args.spacing}


@torch.no_grad()
def sample_func(model, n_samples=10, diffusion=None, seed=0, generator=None, device=None,
                batch_size=256, return_steps=(), clip_denoised=True, progress=True,
                sampler="ddpm", sampling_steps=None, eta=0.0, spacing="uniform", amp="none", compile=False):
    """Draw `n_samples` images with Algorithm 2 (T reverse steps from pure noise), or with DDIM.

    sampler: "ddpm" (ancestral, T steps) or "ddim" (sampling_steps steps, default 50, `eta` = 0
    deterministic, 1 ancestral-like; `spacing` uniform or quadratic).
    seed / generator: reproducibility. With a seed, batch k uses its own generator seeded with
    seed + k, so the first batches are the same whatever n_samples is. A torch.Generator (on the
    model's device) is used as is for every batch instead.
    return_steps: the paper's t in {0, ..., T} whose x_t are kept (T = noise, 0 = the sample).
    Returns (samples, steps): samples (n_samples, C, H, W) in [-1, 1] on the CPU, and
    steps {t: (n_samples, C, H, W)} for the reverse-process figure.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"sampler must be ddpm or ddim, got {sampler!r}")
    diffusion = diffusion or GaussianDiffusion()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    m = model.model_args
    shape = (m["in_channels"], m["resolution"], m["resolution"])
    samples, steps = [], {}
    net = _compiled(model, device) if compile else model
    try:
        for k, start in enumerate(range(0, n_samples, batch_size)):
            b = min(batch_size, n_samples - start)
            g = generator if generator is not None else torch.Generator(device=device).manual_seed(seed + k)
            kw = dict(generator=g, device=device, clip_denoised=clip_denoised, return_steps=return_steps,
                      progress=progress)
            with autocast(device, amp), _freezing(compile):
                x, st = _loop(diffusion, net, (b, *shape), kw, sampler, sampling_steps, eta, spacing)
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
    if sampler == "ddim":
        return diffusion.ddim_sample_loop(model, shape, sampling_steps=sampling_steps or 50, eta=eta,
                                          spacing=spacing, **kw)
    return diffusion.p_sample_loop(model, shape, **kw)
