"""Train a DDPM on MNIST, then sample from it.

    python run.py --n_epochs 100            # the paper's model and recipe (a GPU job)
    python run.py --preset cpu              # a small model and recipe for ~15 min on 2 CPU cores
    python run.py --preset reference        # the published checkpoint: the same model, ~90 min
    python run.py --resume                  # continue the run saved at --checkpoint

Explicit flags override the preset. Writes the checkpoint (--checkpoint), generated_samples.jpg
and train_loss.png (in --out_dir).
"""
import json
import os
import sys
import time
from dataclasses import asdict, fields

import torch

from dataloader import mnist_tensors
from diffusion import GaussianDiffusion, from_model_range
from model import UNet, count_parameters
from sample import add_sampler_args, label_kwargs, sample_func, sampler_kwargs
from train import TrainConfig, TrainingInterrupted, load_checkpoint, train_func
from utils import (OneLineArgumentParser, UserError, atomic_write, check_amp, check_writable, plot_loss,
                   run_main, save_image_grid, setup_distributed)

# Presets: model and recipe. "paper" is Ho et al. 2020's CIFAR-10 setup on 28x28 MNIST.
# "cpu" was chosen by measuring short runs on a 2-core CPU (see README, "The cpu preset").
PRESETS = {
    "paper": dict(ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_res=(14,), dropout=0.1,
                  n_epochs=100, batch_size=128, lr=2e-4, warmup=5000, lr_decay="none", ema_decay=0.9999),
    "cpu": dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_res=(7,), dropout=0.0,
                n_epochs=3, batch_size=64, lr=1e-3, warmup=200, lr_decay="cosine", ema_decay=0.999),
}
# "reference": the published checkpoint (checkpoints/ddpm_trained.pt), about 90 minutes on 2 CPU
# cores: the cpu preset's model and recipe for 20 epochs, with a slower EMA for the longer run.
PRESETS["reference"] = dict(PRESETS["cpu"], n_epochs=20, ema_decay=0.9995)
MODEL_FLAGS = ("ch", "ch_mult", "num_res_blocks", "attn_res", "dropout")
# Flags outside the presets; None on the command line means "not given" (so --resume can tell).
DEFAULTS = dict(max_steps=0, grad_clip=1.0, save_every=1000, seed=0, var_type="fixed_large")


def int_list(s):
    """'1,2,2' -> (1, 2, 2); '' -> ()."""
    try:
        return tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {s!r}") from None


int_list.__name__ = "comma-separated integer list"


def get_parser():
    p = OneLineArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="paper", choices=sorted(PRESETS), help="model and recipe defaults")
    p.add_argument("--n_epochs", type=int, help="passes over the 60k training images")
    p.add_argument("--max_steps", type=int, help="stop after this many optimizer steps (default 0 = no limit)")
    p.add_argument("--batch_size", type=int, help="training batch size")
    p.add_argument("--lr", type=float, help="Adam learning rate after warm-up")
    p.add_argument("--warmup", type=int, help="linear learning-rate warm-up steps")
    p.add_argument("--lr_decay", choices=["none", "cosine"], help="after warm-up: constant, or cosine to 0")
    p.add_argument("--ema_decay", type=float, help="EMA decay of the weights used for sampling")
    p.add_argument("--grad_clip", type=float, help="gradient-norm clip (default 1.0; 0 = off)")
    p.add_argument("--ch", type=int, help="UNet base width")
    p.add_argument("--ch_mult", type=int_list, help="width multipliers per resolution, e.g. 1,2,2")
    p.add_argument("--num_res_blocks", type=int, help="residual blocks per resolution")
    p.add_argument("--attn_res", type=int_list, help="resolutions with self-attention, e.g. 14 ('' = none)")
    p.add_argument("--dropout", type=float, help="dropout in the residual blocks")
    p.add_argument("--var_type", choices=["fixed_large", "fixed_small"],
                   help="reverse variance sigma_t^2: fixed_large = beta_t (default, paper's CIFAR) or beta-tilde_t")
    p.add_argument("--class_cond", action="store_true",
                   help="class-conditional model for classifier-free guidance (Ho & Salimans 2022)")
    p.add_argument("--p_uncond", type=float,
                   help="with --class_cond: probability of training on the null label instead (default 0.1)")
    p.add_argument("--n_samples", type=int, default=10, help="digits to sample after training")
    add_sampler_args(p)
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--seed", type=int, help="seed for init, data order, noise and sampling (default 0)")
    p.add_argument("--data_dir", default="./data", help="where MNIST is (or is put)")
    p.add_argument("--checkpoint", default="ddpm_trained.pt", help="checkpoint path (written; read by --resume)")
    p.add_argument("--save_every", type=int, help="checkpoint every N steps (default 1000)")
    p.add_argument("--resume", action="store_true", help="continue the run saved at --checkpoint")
    p.add_argument("--out_dir", default=".", help="where generated_samples.jpg and train_loss.png go")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    p.add_argument("--dry_run", action="store_true", help="print the resolved configuration and exit")
    return p


def unet_args(values):
    """UNet keyword arguments from preset-style values (flag names: attn_res -> attn_resolutions)."""
    return dict(ch=values["ch"], ch_mult=tuple(values["ch_mult"]), num_res_blocks=values["num_res_blocks"],
                attn_resolutions=tuple(values["attn_res"]), dropout=values["dropout"])


def resolve_config(args):
    """Preset values, overridden by every flag given explicitly. Returns (model_args, TrainConfig)."""
    preset = PRESETS[args.preset]
    val = {k: getattr(args, k) if getattr(args, k) is not None else preset[k] for k in preset}
    model_args = dict(unet_args(val), num_classes=10 if args.class_cond else None)
    val.update({k: getattr(args, k) if getattr(args, k) is not None else d for k, d in DEFAULTS.items()})
    cfg = TrainConfig(n_epochs=val["n_epochs"], max_steps=val["max_steps"], batch_size=val["batch_size"],
                      lr=val["lr"], warmup=val["warmup"], lr_decay=val["lr_decay"], grad_clip=val["grad_clip"],
                      ema_decay=val["ema_decay"], save_every=val["save_every"], seed=val["seed"],
                      amp=args.amp, compile=args.compile, p_uncond=0.1 if args.p_uncond is None else args.p_uncond)
    return model_args, cfg


def validate(args, model_args, cfg):
    checks = [(cfg.n_epochs >= 1, f"--n_epochs must be >= 1, got {cfg.n_epochs}"),
              (args.n_samples >= 1, f"--n_samples must be >= 1, got {args.n_samples}"),
              (cfg.batch_size >= 1, f"--batch_size must be >= 1, got {cfg.batch_size}"),
              (cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}"),
              (cfg.max_steps >= 0, f"--max_steps must be >= 0, got {cfg.max_steps}"),
              (cfg.warmup >= 0, f"--warmup must be >= 0, got {cfg.warmup}"),
              (0 <= cfg.ema_decay < 1, f"--ema_decay must be in [0, 1), got {cfg.ema_decay}"),
              (cfg.save_every >= 1, f"--save_every must be >= 1, got {cfg.save_every}"),
              (0 <= cfg.p_uncond <= 1, f"--p_uncond must be in [0, 1], got {cfg.p_uncond}"),
              (args.p_uncond is None or model_args.get("num_classes") is not None,
               "--p_uncond is for class-conditional models; add --class_cond"),
              (model_args["ch"] >= 4 and model_args["ch"] % 2 == 0,
               f"--ch must be even and >= 4 (time embedding and GroupNorm widths), got {model_args['ch']}"),
              (len(model_args["ch_mult"]) >= 1 and min(model_args["ch_mult"]) >= 1,
               f"--ch_mult needs positive integers, got {model_args['ch_mult']}"),
              (model_args["num_res_blocks"] >= 1, f"--num_res_blocks must be >= 1, got {model_args['num_res_blocks']}"),
              (0 <= model_args["dropout"] < 1, f"--dropout must be in [0, 1), got {model_args['dropout']}")]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
    if 28 % 2 ** (len(model_args["ch_mult"]) - 1):
        raise UserError(f"--ch_mult {model_args['ch_mult']}: 28x28 can be halved at most twice (3 levels)")
    resolutions = [28 // 2 ** i for i in range(len(model_args["ch_mult"]))]
    for r in model_args["attn_resolutions"]:
        if r not in resolutions:
            raise UserError(f"--attn_res {r} is not a resolution of this model {resolutions}")


def check_resume_args(args, ckpt):
    """--resume: the model, the diffusion and the data order come from the checkpoint; explicit
    flags that would change them are refused, naming the difference."""
    saved, diffs = ckpt["model_args"], []
    for flag, key in zip(MODEL_FLAGS, ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout")):
        given = getattr(args, flag)
        if given is not None and _norm(given) != _norm(saved[key]):
            diffs.append(f"--{flag} {_norm(given)} but the checkpoint has {_norm(saved[key])}")
    if args.class_cond and saved.get("num_classes") is None:
        diffs.append("--class_cond but the checkpoint is unconditional")
    if args.var_type is not None and args.var_type != ckpt["diffusion_args"]["var_type"]:
        diffs.append(f"--var_type {args.var_type} but the checkpoint has {ckpt['diffusion_args']['var_type']}")
    for k in ("batch_size", "seed"):  # the data order and the position in it depend on these
        if getattr(args, k) is not None and getattr(args, k) != ckpt["train_config"][k]:
            diffs.append(f"--{k} {getattr(args, k)} but the checkpoint has {ckpt['train_config'][k]}")
    if diffs:
        raise UserError("cannot resume with a different model or data order: " + "; ".join(diffs))


def _norm(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


def train_config_for_resume(args, ckpt):
    """The checkpoint's training settings, with every flag given explicitly taking precedence."""
    saved = dict(ckpt["train_config"])
    saved.update({k: getattr(args, k) for k in ("n_epochs", "lr", "warmup", "lr_decay", "ema_decay", "max_steps",
                                                "save_every", "grad_clip", "p_uncond") if getattr(args, k) is not None})
    saved.update(amp=args.amp, compile=args.compile)  # how to run, not what to train: from the flags
    return TrainConfig(**{f.name: saved[f.name] for f in fields(TrainConfig) if f.name in saved})


def protect_existing(path, keep_copy=True):
    """A new run (no --resume) over an existing checkpoint: refuse if that holds an unfinished run,
    else keep it as <path>.prev (written atomically; by one process under torchrun) before this
    run's first save replaces it."""
    if not os.path.exists(path):
        return
    try:
        old = load_checkpoint(path)
    except UserError:
        old = {}
    if "optimizer" in old and "total_steps" in old and old["step"] < old["total_steps"]:
        raise UserError(f"{path} holds an unfinished run (step {old['step']} of {old['total_steps']}); continue it "
                        f"with --resume, or move it away (or pick another --checkpoint) to start a new run")
    if not keep_copy:
        return
    with open(path, "rb") as f:
        data = f.read()
    atomic_write(path + ".prev", lambda f: f.write(data))
    print(f"{path} exists and --resume was not given: starting a new run; the old file is kept as {path}.prev")


def main(argv=None):
    args = get_parser().parse_args(argv)
    model_args, cfg = resolve_config(args)
    validate(args, model_args, cfg)
    device, rank, world = setup_distributed(args.device)  # (device, 0, 1) without torchrun
    try:
        _main(args, model_args, cfg, device, rank, world)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def _main(args, model_args, cfg, device, rank, world):
    main_process = rank == 0  # prints, writes the checkpoint, the plot and the samples
    skw = sampler_kwargs(args)
    check_amp(device, args.amp)
    ckpt = None
    if args.resume:
        if not os.path.exists(args.checkpoint):
            raise UserError(f"--resume: no checkpoint at {args.checkpoint}; drop --resume to start a new run")
        ckpt = load_checkpoint(args.checkpoint)
        if "optimizer" not in ckpt:
            raise UserError(f"--resume: {args.checkpoint} holds weights only (no optimizer state); it cannot be resumed")
        check_resume_args(args, ckpt)
        model_args = dict(ckpt["model_args"])
        cfg = train_config_for_resume(args, ckpt)
        validate(args, model_args, cfg)
    lkw = label_kwargs(args, model_args.get("num_classes"), args.n_samples)  # checked before training
    samples_path = os.path.join(args.out_dir, "generated_samples.jpg")
    loss_path = os.path.join(args.out_dir, "train_loss.png")
    for path in (args.checkpoint, samples_path, loss_path):
        check_writable(path)
    diffusion_args = ckpt["diffusion_args"] if ckpt else GaussianDiffusion(var_type=args.var_type or "fixed_large").args
    meta = ckpt.get("meta", {}) if ckpt else {"preset": args.preset}

    if cfg.batch_size % world:
        raise UserError(f"--batch_size {cfg.batch_size} is the global batch and must divide evenly over the "
                        f"{world} processes")
    log = print if main_process else (lambda *a, **k: None)
    log("configuration:", json.dumps({"preset": meta.get("preset"), "device": str(device), "processes": world,
                                       "model": model_args,
                                         "train": asdict(cfg), "diffusion": diffusion_args,
                                         "n_samples": args.n_samples, "sampler": skw,
                                         "guidance_scale": lkw["guidance_scale"], "checkpoint": args.checkpoint,
                                         "resume": args.resume, "data_dir": args.data_dir}, indent=1))
    if args.dry_run:
        return
    if not args.resume:
        protect_existing(args.checkpoint, keep_copy=main_process)

    if world > 1 and os.environ.get("LOCAL_RANK") == "0":
        mnist_tensors(args.data_dir, train=True, verbose=False)  # one process per node fetches the data
    if world > 1:
        torch.distributed.barrier()
    images, labels = mnist_tensors(args.data_dir, train=True, verbose=main_process)
    torch.manual_seed(cfg.seed)
    model = UNet(**model_args)
    diffusion = GaussianDiffusion(**diffusion_args)
    log(f"UNet with {count_parameters(model) / 1e6:.2f}M parameters; {len(images)} training images")

    t0 = time.time()
    try:
        state = train_func(model, diffusion, images, cfg, args.checkpoint, device=device, resume=ckpt,
                           model_meta=meta, progress=not args.no_progress,
                           labels=labels if model_args.get("num_classes") is not None else None)
    except TrainingInterrupted as e:
        log(f"\n{e}. Resume with: {_resume_command(args, world)}")
        sys.exit(128 + e.signum)  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    if not main_process:
        return
    if ckpt is not None and state["step"] == ckpt["step"]:
        print(f"{args.checkpoint} was already at step {state['step']}: nothing to train (raise --n_epochs or "
              f"--max_steps to train further); sampling from it")
    print(f"trained to step {state['step']} in {time.time() - t0:.0f} s; final loss "
          f"{state['loss_history'][-100:].mean():.4f} (mean of the last {min(100, len(state['loss_history']))} steps); saved {args.checkpoint}")
    plot_loss(state["loss_history"], loss_path)

    model.load_state_dict(state["ema"])  # sample from the EMA weights
    t0 = time.time()
    samples, _ = sample_func(model, args.n_samples, diffusion, seed=cfg.seed, device=device,
                             progress=not args.no_progress, amp=args.amp, compile=args.compile, **skw, **lkw)
    save_image_grid(from_model_range(samples), samples_path, nrow=5)
    print(f"sampled {args.n_samples} digits in {time.time() - t0:.1f} s; wrote {samples_path} and {loss_path}")


def _resume_command(args, world):
    launcher = "python" if world == 1 else f"torchrun --nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', world)}"
    return f"{launcher} {' '.join([os.path.basename(sys.argv[0])] + _resume_argv(args))}"


def _resume_argv(args):
    out = ["--resume", "--checkpoint", args.checkpoint]
    for k in ("data_dir", "out_dir", "device", "amp"):
        if getattr(args, k) != get_parser().get_default(k):
            out += [f"--{k}", str(getattr(args, k))]
    return out + (["--compile"] if args.compile else [])


if __name__ == "__main__":
    run_main(main)
