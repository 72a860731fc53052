"""Sampling from a trained model: the 1000-step ancestral reverse process (Algorithm 2 of Ho et al.
2020) or a few-step sampler (samplers.SAMPLERS), in batches, with per-sample noise streams, mixed
precision, torch.compile and classifier-free guidance; and the sampling flags, each beside its check."""
import math
import weakref

import torch
from tqdm.auto import tqdm

from diffusion import GaussianDiffusion
from samplers import DEFAULT_STEPS, SAMPLERS, SHARED_OPTIONS, SPACINGS, Denoiser, SampleNoise, noise_source, options
from utils import UserError, autocast


def add_sampler_flags(p):
    """--sampler and its settings, from the registry (samplers.SAMPLERS): a sampler's options are flags.
    sampler_kwargs checks them."""
    p.add_argument("--sampler", default="ddpm", choices=list(SAMPLERS),
                   help="; ".join(f"{s.name}: {s.help}" for s in SAMPLERS.values()))
    p.add_argument("--sampling_steps", type=int,
                   help=f"few-step samplers: solver steps (default {DEFAULT_STEPS}), one network evaluation each "
                        "(edm: two, one on the last); ddpm always takes T")
    p.add_argument("--spacing", choices=SPACINGS,
                   help="few-step samplers: where the steps go in t (default: the sampler's own, "
                        + ", ".join(f"{s.name} {s.spacing}" for s in SAMPLERS.values() if s.spacing) + ")")
    for option, (names, (default, help, *choices)) in options().items():
        only = "every sampler" if len(names) == len(SAMPLERS) else f"{' or '.join(names)} only"
        p.add_argument(f"--{option}", type=type(default), choices=choices[0] if choices else None,
                       help=f"{only}: {help}")


def sampler_kwargs(args, diffusion):
    """Checked sampler settings {sampler, sampling_steps, spacing, options...} from parsed flags
    (add_sampler_flags) for `diffusion` (its T and schedule place the steps); none is accepted and silently
    ignored."""
    s, all_options, T = SAMPLERS[args.sampler], options(), diffusion.T
    own = [o for o in all_options if o not in SHARED_OPTIONS]
    given = [o for o in own if getattr(args, o, None) is not None and o not in s.options]
    if s.spacing is None:  # every timestep: the paper's sampler
        if args.sampling_steps not in (None, T) or args.spacing is not None or given:
            few = [n for n, o in SAMPLERS.items() if o.spacing]
            raise UserError(f"--sampling_steps, --spacing and --{', --'.join(own)} are for the few-step "
                            f"samplers (--sampler {', '.join(few[:-1])} or {few[-1]}); "
                            f"the {s.name} sampler always takes all T={T} steps")
        return {"sampler": s.name, **shared_kwargs(args)}
    if given:
        raise UserError(f"--{given[0]} is for --sampler {' or '.join(all_options[given[0]][0])}; {s.name} has none")
    kw = {"sampler": s.name, "sampling_steps": DEFAULT_STEPS if args.sampling_steps is None else args.sampling_steps,
          "spacing": args.spacing or s.spacing}
    try:
        s.timesteps(diffusion, kw["sampling_steps"], kw["spacing"])
    except ValueError as e:
        raise UserError(f"--sampling_steps {kw['sampling_steps']}: {e}") from None
    for o, (default, _, *choices) in s.options.items():
        kw[o] = default if getattr(args, o) is None else getattr(args, o)
        if not choices and kw[o] < 0:  # a choice is checked by the flag itself
            raise UserError(f"--{o} must be >= 0, got {kw[o]}")
    return {**kw, **shared_kwargs(args)}


def shared_kwargs(args):
    """The checked options every sampler takes (samplers.SHARED_OPTIONS), only where they differ from their
    defaults: eps_scale 1 (off) is no setting, so a run without it records and samples as before."""
    eps_scale = getattr(args, "eps_scale", None)
    if eps_scale is None or eps_scale == 1:
        return {}
    if not (eps_scale > 0 and math.isfinite(eps_scale)):
        raise UserError(f"--eps_scale must be > 0, got {eps_scale}")
    return {"eps_scale": eps_scale}


def network_evaluations(skw, T, guidance_scale=0.0):
    """Network evaluations (NFE) per sample (the registry's count for the steps: T for ddpm), twice
    that under classifier-free guidance with w > 0 (two passes per step)."""
    return SAMPLERS[skw["sampler"]].nfe(skw.get("sampling_steps", T)) * (2 if guidance_scale else 1)


def check_n_samples(n):
    if n < 1:
        raise UserError(f"--n_samples must be >= 1, got {n}")


def valid_guidance_scale(w):
    """A guidance scale w of eq. (6) in Ho & Salimans (2022) must be finite and >= 0."""
    return w >= 0 and math.isfinite(w)


def add_label_flags(p):
    """--digits and --guidance_scale, for class-conditional models; label_kwargs checks them."""
    p.add_argument("--digits", help="class-conditional models: digits to draw, e.g. 0,1,2 (repeated to fill "
                   "the samples), 'all' (0-9, the default), 'random' (each drawn uniformly, seeded by --seed) or "
                   "'none' (unconditional, the null label)")
    p.add_argument("--guidance_scale", type=float,
                   help="class-conditional models: classifier-free guidance w, eps = (1+w) eps(x,y) - w eps(x,null) "
                        "(default 0 = plain conditional)")


def label_kwargs(args, num_classes, n_samples):
    """Checked --digits / --guidance_scale -> {"labels": (n_samples,) long or None, "guidance_scale": w}.

    For an unconditional model (num_classes None) both flags are refused. For a conditional one the
    digits are repeated to fill n_samples; 'none' asks for the null label (unconditional samples);
    'random' draws each label uniformly from 0..num_classes-1 with a generator seeded by --seed (the
    conditional model as an unconditional generator of digits).
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
    if spec == "random":
        g = torch.Generator().manual_seed(getattr(args, "seed", 0) or 0)
        return {"labels": torch.randint(0, num_classes, (n_samples,), generator=g), "guidance_scale": w}
    if spec == "all":
        digits = list(range(num_classes))
    else:
        try:
            digits = [int(v) for v in spec.split(",") if v.strip()]
        except ValueError:
            digits = []
        if not digits or any(not 0 <= d < num_classes for d in digits):
            raise UserError(f"--digits must be 'all', 'random', 'none' or comma-separated digits in "
                            f"0..{num_classes - 1}, "
                            f"got {args.digits!r}")
    labels = torch.tensor(digits, dtype=torch.long).repeat((n_samples + len(digits) - 1) // len(digits))[:n_samples]
    return {"labels": labels, "guidance_scale": w}


def guided(net, y, w, null_label):
    """The network the samplers call, eps(x, t), for labels y under classifier-free guidance
    (Ho & Salimans 2022, eq. 6): eps = (1 + w) eps(x, y) - w eps(x, null). With w > 0 the
    conditional and the unconditional passes run as one batch of twice the size. On a v-prediction
    model it combines the two v's alike: eps is affine in v with the same x_t term, and the
    weights sum to 1, so that is the combination of the eps's they imply (Denoiser converts after)."""
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
                sampler="ddpm", sampling_steps=None, spacing=None, amp="none", compile=False,
                labels=None, guidance_scale=0.0, eps_scale=1.0, **options):
    """Draw `n_samples` images with Algorithm 2 (T reverse steps from pure noise), or a few-step sampler.

    labels: (n_samples,) class labels for a class-conditional model (its null label = unconditional),
    guided with weight `guidance_scale` (see guided); None for an unconditional model.

    sampler: a name of samplers.SAMPLERS: "ddpm" (ancestral, T steps), or a few-step sampler over
    `sampling_steps` steps (default samplers.DEFAULT_STEPS) placed by `spacing` (default: the sampler's
    own), with its `options` (e.g. ddim's eta: 0 deterministic, 1 ancestral-like).
    seed / generator: reproducibility. With a seed, sample i draws all its noise from its own stream
    (samplers.SampleNoise), so it depends only on (seed, i): the same digits whatever batch_size,
    n_samples or device. A torch.Generator (on the model's device) is used as is instead, one stream
    for all samples (faster on a GPU, but the digits then depend on the batching).
    return_steps: the paper's t in {0, ..., T} whose x_t are kept (T = noise, 0 = the sample).
    Returns (samples, steps): samples (n_samples, C, H, W) in [-1, 1] on the CPU, and
    steps {t: (n_samples, C, H, W)} for the reverse-process figure.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    s, diffusion = SAMPLERS[sampler], diffusion or GaussianDiffusion()
    ts = s.timesteps(diffusion, sampling_steps, spacing)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    m, null_label = model.model_args, getattr(model, "num_classes", None)
    if (labels is None) != (null_label is None):
        raise ValueError("labels are required by a class-conditional model and refused by an unconditional one")
    if labels is not None and len(labels) != n_samples:
        raise ValueError(f"need one label per sample: {len(labels)} labels for {n_samples} samples")
    samples, steps, was_training = [], {}, model.training
    net = _compiled(model.eval(), device) if compile else model.eval()
    try:
        for start in range(0, n_samples, batch_size):
            b = min(batch_size, n_samples - start)
            noise = noise_source(generator if generator is not None else
                                 SampleNoise(seed, range(start, start + b), device), device)
            y = None if labels is None else labels[start:start + b].to(device)
            with autocast(device, amp), _freezing(compile), _Keep(ts, return_steps, diffusion.T, progress) as keep:
                x = keep.start(noise((b, m["in_channels"], m["resolution"], m["resolution"])))
                denoiser = Denoiser(guided(net, y, guidance_scale, null_label), diffusion, clip_denoised, eps_scale)
                x = s.fn(denoiser, x, ts, noise, keep, **s.fixed, **options)
            samples.append(x.cpu())
            for t, xt in keep.steps.items():
                steps.setdefault(t, []).append(xt.cpu())
    finally:
        model.train(was_training)
    return torch.cat(samples), {t: torch.cat(v) for t, v in steps.items()}


class _Keep:
    """The samplers' callback: a progress bar, and the x_k of return_steps (the paper's k in {0, ..., T}):
    a step from t down to t_next gives the x_k for t_next < k <= t (the last visit wins); x_T is the noise."""

    def __init__(self, ts, return_steps, T, progress):
        self.keep, self.T, self.steps = set(return_steps), T, {}
        self.bar = tqdm(total=len(ts) - 1, desc="sampling", disable=not progress, leave=False)

    def __enter__(self):
        return self

    def start(self, x):
        if self.T in self.keep:
            self.steps[self.T] = x.clone()
        return x

    def __call__(self, t, t_next, x):
        for k in [k for k in self.keep if t_next < k <= t and k != self.T]:
            self.steps[k] = x.clone()
        self.bar.update(1)

    def __exit__(self, *exc):
        self.bar.close()


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
