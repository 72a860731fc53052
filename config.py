"""Configuration: the defaults, the presets that override them, and the flags the scripts share.

The defaults are the paper's (Ho et al. 2020, CIFAR-10 setup, on 28x28 MNIST), each written once
where its concept lives: the UNet layout in `model.UNet`'s signature (Appendix B), the noise
schedule in `diffusion.GaussianDiffusion`'s, the training recipe in `TrainConfig` below. A preset
is data: the values it changes. Beside each default, once: its flag's help, its check and what
--resume does with it (`flag_spec`); run.py's flags, the checks, --resume and docs/flags.md's run.py
table are derived from that (`python experiments/flags_doc.py` rewrites the table). The sampler and
label flags are sample.py's, beside their checks.

    model_args, diffusion_args, cfg = resolve("cpu", lr=5e-4)   # as `python run.py --preset cpu --lr 5e-4`
"""
import argparse
import inspect
from dataclasses import dataclass, field, fields

from diffusion import LOSS_WEIGHTS, PREDICTIONS, SCHEDULES, VAR_TYPES, GaussianDiffusion
from model import UNet
from utils import AMP_MODES, UserError

LR_DECAYS = ("none", "cosine")


def flag_spec(help, check=None, resume="may change", choices=None, parse=None):
    """What a flag needs besides its default: its help text (None: no flag), its check, a pair
    (predicate, "must be ...") or the `choices`, and what --resume does with it: "keep" (the
    checkpoint's value; a flag that differs is refused), "may change" (a flag given overrides the
    checkpoint's) or "from flags" (how to run, not what to train: always the flag's). parse: how the
    flag's text becomes the value (default: the default's type; int_list for a tuple)."""
    check = (lambda v: v in choices, "must be " + ", ".join(choices[:-1]) + " or " + choices[-1]) if choices else check
    return dict(help=help, check=check, resume=resume, choices=choices, parse=parse)


def hp(default, help, check=None, resume="may change", choices=None, parse=None):
    """A TrainConfig field: its default and flag_spec(...)."""
    return field(default=default, metadata=flag_spec(help, check, resume, choices, parse))


def at_least(lo):
    return (lambda v: v >= lo, f"must be >= {lo}")


def float_list(s):
    """'0.999,0.9999' -> (0.999, 0.9999); '' -> ()."""
    try:
        return tuple(float(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


@dataclass
class TrainConfig:
    """The training recipe: each field's default, flag help, check and --resume rule, written once."""
    n_epochs: int = hp(100, "passes over the 60k training images", at_least(1))
    max_steps: int = hp(0, "stop after this many optimizer steps (0 = no limit)", at_least(0))
    batch_size: int = hp(128, "training batch, the paper's (the global batch under torchrun)", at_least(1), "keep")
    lr: float = hp(2e-4, "Adam learning rate after warm-up (the paper's for CIFAR-10)",
                   (lambda v: v > 0, "must be > 0"))
    warmup: int = hp(5000, "linear learning-rate warm-up steps (the paper's)", at_least(0))
    lr_decay: str = hp("none", "after warm-up: constant (the paper's), or cosine to 0 at the last step",
                       choices=LR_DECAYS)
    grad_clip: float = hp(1.0, "gradient-norm clip (the authors' code's; 0 = off)", at_least(0))
    ema_decay: float = hp(0.9999, "EMA decay of the weights used for sampling (the paper's), warmed up as "
                          "min(decay, (1+n)/(10+n)) after n steps", (lambda v: 0 <= v < 1, "must be in [0, 1)"))
    ema_decays: tuple = hp((), "more EMAs of the weights, e.g. 0.999,0.9999, tracked beside --ema_decay's with the "
                           "same warm-up and stored in the checkpoint, to compare EMA lengths after one run "
                           "(evaluate.py --ema D samples one; '' = none)",
                           (lambda v: all(0 < d < 1 for d in v) and len(set(v)) == len(v),
                            "must be decays in (0, 1), each once"), "keep", parse=float_list)
    save_every: int = hp(1000, "checkpoint every N steps (and at the end)", at_least(1))
    # no flag: move the loss to the host and check it is finite every N steps
    log_every: int = hp(25, None, at_least(1), "keep")
    seed: int = hp(0, "seed for init, data order, noise, dropout and sampling", resume="keep")
    amp: str = hp("none", "mixed precision (autocast; fp16 trains with a GradScaler and needs CUDA)",
                  resume="from flags", choices=AMP_MODES)
    compile: bool = hp(False, "torch.compile the network (on CUDA with its own CUDA graphs, mode reduce-overhead)",
                       resume="from flags")
    graph_step: bool = hp(False, "with --compile on CUDA: capture the whole training step (draws, forward, backward, "
                          "Adam, EMAs) as one CUDA graph instead (cuda_graph.py; not yet measured on a GPU)",
                          resume="from flags")
    p_uncond: float = hp(0.1, "with --class_cond: probability of training on the null label instead",
                         (lambda v: 0 <= v <= 1, "must be in [0, 1]"))
    loss_weight: str = hp("none", "none (the paper's L_simple) or min_snr (Min-SNR-gamma weighting, Hang et al. "
                          "2023: each timestep's eps loss times min(SNR_t, gamma) / SNR_t; with --prediction v "
                          "its v loss times min(SNR_t, gamma) / (SNR_t + 1))", choices=LOSS_WEIGHTS)
    snr_gamma: float = hp(5.0, "gamma of --loss_weight min_snr (their default); refused without it",
                          (lambda v: v > 0, "must be > 0"))
    eval_every: int = hp(0, "every N steps and at the end, judge --eval_samples digits of the EMA (--ema_decay's; "
                         "dpm++2m-sde, 20 NFE, fixed noise) into the checkpoint's curve; trains bitwise as without "
                         "(0 = never)",
                         at_least(0))
    eval_samples: int = hp(200, "digits per --eval_every evaluation (FID at 200 reads higher than at 1000)",
                           at_least(10))

    def __post_init__(self):  # every TrainConfig is checked once, where it is made
        self.ema_decays = tuple(float(d) for d in self.ema_decays)  # a list, from a checkpoint's dict
        for f in fields(self):
            check, v = f.metadata["check"], getattr(self, f.name)
            if check and not check[0](v):
                raise UserError(f"--{f.name} {check[1]}, got {v}")
        if self.ema_decay in self.ema_decays:
            raise UserError(f"--ema_decays repeats --ema_decay {self.ema_decay}: the main EMA already tracks it")


def _signature_defaults(cls, names):
    params = inspect.signature(cls).parameters
    return {k: params[k].default for k in names}


# The GaussianDiffusion arguments that are flags (T and the linear betas are not).
DIFFUSION_FLAGS = ("var_type", "schedule", "prediction")
# Flag name -> UNet argument (one flag is shorter than its argument).
MODEL_FLAGS = {"ch": "ch", "ch_mult": "ch_mult", "num_res_blocks": "num_res_blocks", "attn_res": "attn_resolutions",
               "dropout": "dropout"}
DEFAULTS = {**{flag: v for flag, v in zip(MODEL_FLAGS, _signature_defaults(UNet, MODEL_FLAGS.values()).values())},
            **_signature_defaults(GaussianDiffusion, DIFFUSION_FLAGS),
            **{f.name: f.default for f in fields(TrainConfig)}}
# Every flag with a DEFAULTS entry: the model's and the diffusion's (fixed by a checkpoint), then the recipe's.
FLAGS = {"ch": flag_spec("UNet base width (even, >= 4)", resume="keep"),
         "ch_mult": flag_spec("width multipliers per resolution, e.g. 1,2,2 (at most 3 levels: 28, 14, 7)",
                              resume="keep"),
         "num_res_blocks": flag_spec("residual blocks per resolution", resume="keep"),
         "attn_res": flag_spec("resolutions with self-attention, e.g. 14 ('' = none)", resume="keep"),
         "dropout": flag_spec("dropout in the residual blocks", resume="keep"),
         "var_type": flag_spec("reverse variance sigma_t^2: fixed_large = beta_t (the paper's CIFAR-10 setting) or "
                               "fixed_small = beta-tilde_t", resume="keep", choices=VAR_TYPES),
         "schedule": flag_spec("noise schedule: linear betas 1e-4 to 0.02 (the paper's) or cosine (Nichol & "
                               "Dhariwal 2021, eq. 17)", resume="keep", choices=SCHEDULES),
         "prediction": flag_spec("what the network predicts: eps, the noise (the paper's), or v = sqrt(ab_t) eps - "
                                 "sqrt(1 - ab_t) x_0 (Salimans & Ho 2022, appendix D), trained on the v loss",
                                 resume="keep", choices=PREDICTIONS),
         **{f.name: f.metadata for f in fields(TrainConfig)}}

PRESETS = {
    "paper": {},  # the defaults: Ho et al. 2020's CIFAR-10 model and recipe (a GPU job)
    # Chosen by measuring short runs on a 2-core AMD EPYC (docs/experiments.md): 13.5 minutes there
    # (about 27 on another 2-core AMD EPYC). Not the paper's noise schedule: the cosine one (Nichol &
    # Dhariwal 2021) won the trials at equal cost, feature-FID 38 against 48 at the preset's 2,811 steps
    # over two seeds each (an AMD EPYC's machine-trained judge).
    "cpu": dict(ch=32, num_res_blocks=1, attn_res=(7,), dropout=0.0, schedule="cosine",
                n_epochs=3, batch_size=64, lr=1e-3, warmup=200, lr_decay="cosine", ema_decay=0.999),
}
# The published checkpoint (checkpoints/ddpm_trained.pt), 3.5 hours on 2 cores of an Intel Xeon: the cpu
# preset's model and recipe for 30 epochs (28,110 steps), with a slower EMA for the longer run (0.9995: of
# 0.998, 0.999 and 0.9999 stored beside it, none beat it by the rule of docs/experiments.md).
PRESETS["reference"] = dict(PRESETS["cpu"], n_epochs=30, ema_decay=0.9995)


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
    return model_args, {k: val[k] for k in DIFFUSION_FLAGS}, cfg


def resolve_resume(ckpt, path, class_cond=False, **flags):
    """--resume: the settings of the run saved in the checkpoint dict `ckpt` (read from `path`), as resolve()
    returns them. Each flag's --resume rule (flag_spec) decides: "keep" (the model, the diffusion, the data
    order and the set of EMAs) comes from the checkpoint and a flag that differs is refused, naming the
    difference; "may change" comes from the checkpoint unless the flag is given; "from flags" (how to run:
    --amp, --compile, --graph_step) always comes from the flags. Older checkpoints lack some settings: the
    defaults (linear schedule, eps prediction) are theirs."""
    import checkpoint  # the checkpoint format's predicates (no cycle: checkpoint imports no script)
    if not checkpoint.is_resumable(ckpt):
        raise UserError(f"--resume: {path} holds weights only (no optimizer state); it cannot be resumed")
    saved = {**DEFAULTS, **{flag: ckpt["model_args"][key] for flag, key in MODEL_FLAGS.items()},
             **ckpt["diffusion_args"], **ckpt["train_config"]}
    diffs = [f"--{k} {_norm(flags[k])} but the checkpoint has {_norm(saved[k])}"
             for k, spec in FLAGS.items() if spec["resume"] == "keep" and flags.get(k) is not None
             and _norm(flags[k]) != _norm(saved[k])]
    if ckpt["model_args"].get("num_classes") is None and (class_cond or flags.get("p_uncond") is not None):
        diffs.append(f"--{'class_cond' if class_cond else 'p_uncond'} but the checkpoint is unconditional")
    if diffs:
        raise UserError("cannot resume with a different model, data order or set of EMAs: " + "; ".join(diffs))
    for f in fields(TrainConfig):
        rule, given = f.metadata["resume"], flags.get(f.name)
        if rule == "from flags" or (rule == "may change" and given is not None):
            saved[f.name] = given if given is not None else f.default
    cfg = TrainConfig(**{f.name: saved[f.name] for f in fields(TrainConfig)})
    return dict(ckpt["model_args"]), ckpt["diffusion_args"], cfg


def _norm(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


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
CHECKPOINT = "ddpm_trained.pt"  # run.py writes it, evaluate.py and export.py read it


def int_list(s):
    """'1,2,2' -> (1, 2, 2); '' -> ()."""
    try:
        return tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def add_ema_flag(p, what):
    """--ema DECAY (evaluate.py, export.py): the stored EMA of that decay, one of the run's --ema_decays
    (or its --ema_decay); default the main EMA. Not run.py's --ema_decay, the decay a run trains with."""
    p.add_argument("--ema", type=float, metavar="DECAY", help=f"{what} the stored EMA of this decay: one of the "
                   "run's --ema_decays, or its --ema_decay (default: the main EMA, --ema_decay's)")


def add_device_flag(p):
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")


def add_checkpoint_flag(p, help, published=False):
    """--checkpoint: ./ddpm_trained.pt (what run.py writes), or with `published` the one in checkpoints/."""
    p.add_argument("--checkpoint", default=f"checkpoints/{CHECKPOINT}" if published else CHECKPOINT, help=help)


def default_text(name):
    """A FLAGS entry's default as a flag spells it, or each preset's: '0.1' or 'paper 0.1, cpu 0.0, reference 0.0'."""
    def fmt(v):
        return ",".join(map(str, v)) if isinstance(v, tuple) else str(v)
    changed = [f"{preset} {fmt(vals[name])}" for preset, vals in PRESETS.items() if name in vals]
    return ", ".join([f"paper {fmt(DEFAULTS[name])}", *changed]) if changed else fmt(DEFAULTS[name])


def add_flag(p, name, default=None):
    """The flag of a FLAGS entry: its type from its default, its choices, its help with the default shown.
    default None = "not given": the preset (or, with --resume, the checkpoint) supplies the value."""
    m, d = FLAGS[name], DEFAULTS[name]
    if isinstance(d, bool):
        return p.add_argument(f"--{name}", action="store_true", help=m["help"])
    p.add_argument(f"--{name}", default=default, type=m["parse"] or (int_list if isinstance(d, tuple) else type(d)),
                   choices=m["choices"], help=f"{m['help']} (default {default_text(name)})")


def add_train_flags(p):
    """run.py's model, diffusion and recipe flags, one per FLAGS entry (--amp and --compile: add_speed_flags)."""
    for name, m in FLAGS.items():
        if m["help"] and m["resume"] != "from flags":
            add_flag(p, name)


def add_speed_flags(p):
    add_flag(p, "amp", default="none")
    add_flag(p, "compile")
