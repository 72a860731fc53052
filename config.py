"""Configuration: the defaults, the presets that override them, and the flags the scripts share.

The defaults are the paper's (Ho et al. 2020, CIFAR-10 setup, on 28x28 MNIST), each written once
where its concept lives: the UNet layout in `model.UNet`'s signature (Appendix B), the noise
schedule in `diffusion.GaussianDiffusion`'s, the training recipe in `TrainConfig` below. A preset
is data: the values it changes.

    model_args, diffusion_args, cfg = resolve("cpu", lr=5e-4)   # as `python run.py --preset cpu --lr 5e-4`
"""
import argparse
import inspect
from dataclasses import dataclass, fields

from diffusion import LOSS_WEIGHTS, GaussianDiffusion
from model import UNet
from utils import UserError


@dataclass
class TrainConfig:
    n_epochs: int = 100         # passes over the 60k training images
    max_steps: int = 0          # stop after this many optimizer steps (0 = no limit)
    batch_size: int = 128       # paper: 128 (the global batch under torchrun)
    lr: float = 2e-4            # paper: 2e-4 (CIFAR-10), Adam
    warmup: int = 5000          # linear learning-rate warm-up steps (paper: 5000)
    lr_decay: str = "none"      # "none" (paper: constant after warm-up) or "cosine" (to 0 at the last step)
    grad_clip: float = 1.0      # clip the global gradient norm (authors' code: 1.0; 0 = off)
    ema_decay: float = 0.9999   # paper: 0.9999; warmed up as min(decay, (1+n)/(10+n))
    save_every: int = 1000      # checkpoint every N steps (and at the end)
    log_every: int = 25         # move the loss to the host and check it is finite every N steps
    seed: int = 0               # model init, data order, noise, dropout
    amp: str = "none"           # autocast: "none", "bf16" or "fp16" (fp16 with a GradScaler)
    compile: bool = False       # torch.compile the network for the training step
    p_uncond: float = 0.1       # class-conditional models only: share of labels replaced by the null label
    loss_weight: str = "none"   # "none" (paper: L_simple) or "min_snr" (Min-SNR-gamma, Hang et al. 2023)
    snr_gamma: float = 5.0      # gamma of min_snr (their default)
    eval_every: int = 0         # sample and judge the EMA weights every N steps (0 = never); no effect on training
    eval_samples: int = 200     # digits per evaluation (feature-FID at n = 200: for the curve's shape)

    def __post_init__(self):  # every TrainConfig is checked once, where it is made
        checks = [(self.n_epochs >= 1, "n_epochs must be >= 1"), (self.max_steps >= 0, "max_steps must be >= 0"),
                  (self.batch_size >= 1, "batch_size must be >= 1"), (self.lr > 0, "lr must be > 0"),
                  (self.warmup >= 0, "warmup must be >= 0"), (self.lr_decay in ("none", "cosine"),
                                                              "lr_decay must be none or cosine"),
                  (self.grad_clip >= 0, "grad_clip must be >= 0"),
                  (0 <= self.ema_decay < 1, "ema_decay must be in [0, 1)"),
                  (self.save_every >= 1, "save_every must be >= 1"), (self.log_every >= 1, "log_every must be >= 1"),
                  (self.amp in ("none", "bf16", "fp16"), "amp must be none, bf16 or fp16"),
                  (0 <= self.p_uncond <= 1, "p_uncond must be in [0, 1]"),
                  (self.loss_weight in LOSS_WEIGHTS, "loss_weight must be " + " or ".join(LOSS_WEIGHTS)),
                  (self.snr_gamma > 0, "snr_gamma must be > 0"), (self.eval_every >= 0, "eval_every must be >= 0"),
                  (self.eval_samples >= 10, "eval_samples must be >= 10")]
        for ok, msg in checks:
            if not ok:
                name = msg.split()[0]
                raise UserError(f"--{msg}, got {getattr(self, name)}")


def _signature_defaults(cls, names):
    params = inspect.signature(cls).parameters
    return {k: params[k].default for k in names}


# Flag name -> UNet argument (one flag is shorter than its argument).
MODEL_FLAGS = {"ch": "ch", "ch_mult": "ch_mult", "num_res_blocks": "num_res_blocks", "attn_res": "attn_resolutions",
               "dropout": "dropout"}
DEFAULTS = {**{flag: v for flag, v in zip(MODEL_FLAGS, _signature_defaults(UNet, MODEL_FLAGS.values()).values())},
            **_signature_defaults(GaussianDiffusion, ["var_type", "schedule"]),
            **{f.name: f.default for f in fields(TrainConfig)}}

PRESETS = {
    "paper": {},  # the defaults: Ho et al. 2020's CIFAR-10 model and recipe (a GPU job)
    # Chosen by measuring short runs on a 2-core AMD EPYC (docs/experiments.md): 13.5 minutes there
    # (about 27 on another 2-core AMD EPYC). Not the paper's noise schedule: the cosine one (Nichol &
    # Dhariwal 2021) won the trials at equal cost, feature-FID 38 against 48 at the preset's 2,811 steps
    # over two seeds each (an AMD EPYC's machine-trained judge).
    "cpu": dict(ch=32, num_res_blocks=1, attn_res=(7,), dropout=0.0, schedule="cosine",
                n_epochs=3, batch_size=64, lr=1e-3, warmup=200, lr_decay="cosine", ema_decay=0.999),
}
# The published checkpoint (checkpoints/ddpm_trained.pt), 1.5 to 2 hours on 2 CPU cores: the cpu
# preset's model and recipe for 20 epochs, with a slower EMA for the longer run.
PRESETS["reference"] = dict(PRESETS["cpu"], n_epochs=20, ema_decay=0.9995)
# What --eval_every samples with: the best stochastic sampler at 20 NFE (docs/sampling.md), from fixed
# noise (per-sample streams of this seed, not the run's), the same at every evaluation and in every run.
EVAL_SAMPLER = dict(sampler="dpm++2m-sde", sampling_steps=20, spacing="logsnr")
EVAL_SEED = 0

def resolve(preset="paper", class_cond=False, **overrides):
    """Defaults, then the preset, then the overrides (None = not given). Returns (UNet keyword
    arguments, diffusion keyword arguments, TrainConfig); each is checked where it is made."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose from {', '.join(sorted(PRESETS))}")
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise UserError(f"unknown settings: {', '.join(sorted(unknown))}")
    val = {**DEFAULTS, **PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    if overrides.get("p_uncond") is not None and not class_cond:
        raise UserError("--p_uncond is for class-conditional models; add --class_cond")
    model_args = {arg: val[flag] for flag, arg in MODEL_FLAGS.items()}
    model_args.update(ch_mult=tuple(model_args["ch_mult"]), attn_resolutions=tuple(model_args["attn_resolutions"]),
                      num_classes=10 if class_cond else None)
    check_model_args(model_args)
    cfg = TrainConfig(**{f.name: val[f.name] for f in fields(TrainConfig)})
    if val["snr_gamma"] != DEFAULTS["snr_gamma"] and val["loss_weight"] != "min_snr":
        raise UserError("--snr_gamma is for --loss_weight min_snr")
    return model_args, {"var_type": val["var_type"], "schedule": val["schedule"]}, cfg


def check_model_args(model_args):
    """Build the UNet once on the meta device (no memory, no time) so that a bad layout is refused
    with the network's own message before any data is loaded."""
    import torch
    try:
        with torch.device("meta"):
            UNet(**model_args)
    except ValueError as e:
        raise UserError(f"invalid model: {e}") from None


# ---- the flags several scripts share -------------------------------------------------------------
def int_list(s):
    """'1,2,2' -> (1, 2, 2); '' -> ()."""
    try:
        return tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def add_device_flag(p):
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")


def add_speed_flags(p):
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"],
                   help="mixed precision (autocast; fp16 trains with a GradScaler and needs CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")


def add_sampler_flags(p):
    """--sampler and its settings, from the registry (samplers.SAMPLERS): a sampler's options are flags."""
    from samplers import DEFAULT_STEPS, SAMPLERS, SPACINGS

    p.add_argument("--sampler", default="ddpm", choices=list(SAMPLERS),
                   help="; ".join(f"{s.name}: {s.help}" for s in SAMPLERS.values()))
    p.add_argument("--sampling_steps", type=int,
                   help=f"few-step samplers: solver steps, one network evaluation each (default {DEFAULT_STEPS}); "
                        "ddpm always takes T")
    p.add_argument("--spacing", choices=SPACINGS,
                   help="few-step samplers: where the steps go in t (default: the sampler's own, "
                        + ", ".join(f"{s.name} {s.spacing}" for s in SAMPLERS.values() if s.spacing) + ")")
    options = {}  # option -> (the samplers that take it, (default, help))
    for s in SAMPLERS.values():
        for option, spec in s.options.items():
            options.setdefault(option, ([], spec))[0].append(s.name)
    for option, (names, (default, help)) in options.items():
        p.add_argument(f"--{option}", type=type(default), help=f"{' or '.join(names)} only: {help}")


def add_label_flags(p):
    p.add_argument("--digits", help="class-conditional models: digits to draw, e.g. 0,1,2 (repeated to fill "
                   "the samples), 'all' (0-9, the default) or 'none' (unconditional, the null label)")
    p.add_argument("--guidance_scale", type=float,
                   help="class-conditional models: classifier-free guidance w, eps = (1+w) eps(x,y) - w eps(x,null) "
                        "(default 0 = plain conditional)")
