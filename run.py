"""Train a DDPM on MNIST, then sample from it.

    python run.py --n_epochs 100            # the paper's model and recipe (a GPU job)
    python run.py --preset cpu              # a small model and recipe for ~15 min on 2 CPU cores
    python run.py --preset reference        # the published checkpoint: the same model, 1.5-2 h
    python run.py --resume                  # continue the run saved at --checkpoint

Explicit flags override the preset (config.py). Writes the checkpoint (--checkpoint),
generated_samples.jpg and train_loss.png (in --out_dir).
"""
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, fields

import torch

import checkpoint
import config
from config import TrainConfig
from dataloader import mnist_tensors
from diffusion import GaussianDiffusion, from_model_range
from metrics import TrainingJudge
from model import UNet, count_parameters
from sample import check_n_samples, label_kwargs, network_evaluations, sample_func, sampler_kwargs
from train import TrainingInterrupted, check_batch_divides, train_func
from utils import (
    OneLineArgumentParser,
    UserError,
    atomic_write,
    check_amp,
    check_writable,
    plot_loss,
    run_main,
    save_image_grid,
    setup_distributed,
)

CPU_HINT = "On a CPU, 'python run.py --preset cpu' trains a smaller model in about 15 minutes (README)"


def get_parser():
    """Flags that set the model or the recipe default to None: "not given", so that the preset
    (or, with --resume, the checkpoint) supplies the value."""
    p = OneLineArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="paper", choices=sorted(config.PRESETS), help="model and recipe defaults")
    p.add_argument("--n_epochs", type=int, help="passes over the 60k training images")
    p.add_argument("--max_steps", type=int, help="stop after this many optimizer steps (default 0 = no limit)")
    p.add_argument("--batch_size", type=int, help="training batch size (the global batch under torchrun)")
    p.add_argument("--lr", type=float, help="Adam learning rate after warm-up")
    p.add_argument("--warmup", type=int, help="linear learning-rate warm-up steps")
    p.add_argument("--lr_decay", choices=["none", "cosine"], help="after warm-up: constant, or cosine to 0")
    p.add_argument("--ema_decay", type=float, help="EMA decay of the weights used for sampling")
    p.add_argument("--grad_clip", type=float, help="gradient-norm clip (default 1.0; 0 = off)")
    p.add_argument("--ch", type=int, help="UNet base width")
    p.add_argument("--ch_mult", type=config.int_list, help="width multipliers per resolution, e.g. 1,2,2")
    p.add_argument("--num_res_blocks", type=int, help="residual blocks per resolution")
    p.add_argument("--attn_res", type=config.int_list, help="resolutions with self-attention, e.g. 14 ('' = none)")
    p.add_argument("--dropout", type=float, help="dropout in the residual blocks")
    p.add_argument("--var_type", choices=["fixed_large", "fixed_small"],
                   help="reverse variance sigma_t^2: fixed_large = beta_t (default, paper's CIFAR) or beta-tilde_t")
    p.add_argument("--schedule", choices=["linear", "cosine"],
                   help="noise schedule: linear (the paper's; the paper preset) or cosine (Nichol & Dhariwal 2021; "
                        "the cpu and reference presets)")
    p.add_argument("--loss_weight", choices=["none", "min_snr"],
                   help="none (default, the paper's L_simple) or min_snr (Min-SNR-gamma, Hang et al. 2023)")
    p.add_argument("--snr_gamma", type=float, help="gamma of --loss_weight min_snr (default 5)")
    p.add_argument("--eval_every", type=int,
                   help="every N steps, sample --eval_samples digits from the EMA weights and store their "
                        "feature-FID and confident share in the checkpoint (default 0 = never)")
    p.add_argument("--eval_samples", type=int, help="digits per --eval_every evaluation (default 200)")
    p.add_argument("--class_cond", action="store_true",
                   help="class-conditional model for classifier-free guidance (Ho & Salimans 2022)")
    p.add_argument("--p_uncond", type=float,
                   help="with --class_cond: probability of training on the null label instead (default 0.1)")
    p.add_argument("--n_samples", type=int, default=10, help="digits to sample after training")
    config.add_sampler_flags(p)
    config.add_label_flags(p)
    config.add_speed_flags(p)
    config.add_device_flag(p)
    p.add_argument("--seed", type=int, help="seed for init, data order, noise and sampling (default 0)")
    p.add_argument("--data_dir", default="./data", help="where MNIST is (or is put)")
    p.add_argument("--checkpoint", default="ddpm_trained.pt", help="checkpoint path (written; read by --resume)")
    p.add_argument("--save_every", type=int, help="checkpoint every N steps (default 1000)")
    p.add_argument("--resume", action="store_true", help="continue the run saved at --checkpoint")
    p.add_argument("--out_dir", default=".", help="where generated_samples.jpg and train_loss.png go")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    p.add_argument("--dry_run", action="store_true", help="print the resolved configuration and exit")
    return p


@dataclass
class Plan:
    """Everything a run uses, resolved and checked before any data is loaded."""
    model_args: dict
    diffusion_args: dict
    cfg: TrainConfig
    meta: dict
    resume: dict  # the checkpoint to continue, or None
    sampler: dict  # sample_func's sampler settings
    labels: dict  # sample_func's labels and guidance scale
    samples_path: str
    loss_path: str

    def summary(self, args, device, world):
        return {"preset": self.meta.get("preset"), "device": str(device), "processes": world,
                "model": self.model_args, "train": asdict(self.cfg), "diffusion": self.diffusion_args,
                "n_samples": args.n_samples, "sampler": self.sampler, "guidance_scale": self.labels["guidance_scale"],
                "checkpoint": args.checkpoint, "resume": args.resume, "data_dir": args.data_dir}


def configure(args, device, world):
    """Resolve the preset and the flags (or, with --resume, the checkpoint and the flags) into a Plan;
    every value is checked here, before the data is loaded and before any file is written."""
    check_amp(device, args.amp)
    if args.resume:
        ckpt = resume_checkpoint(args)
        model_args, diffusion_args, meta = dict(ckpt["model_args"]), ckpt["diffusion_args"], ckpt.get("meta", {})
        cfg = train_config_for_resume(args, ckpt)
    else:
        ckpt, meta = None, {"preset": args.preset}
        flags = {k: getattr(args, k, None) for k in config.DEFAULTS}
        model_args, diffusion_args, cfg = config.resolve(args.preset, args.class_cond, **flags)
        diffusion_args = GaussianDiffusion(**diffusion_args).args
    check_batch_divides(cfg.batch_size, world)
    check_n_samples(args.n_samples)
    plan = Plan(model_args, diffusion_args, cfg, meta, ckpt, sampler_kwargs(args, diffusion_args["T"]),
                label_kwargs(args, model_args.get("num_classes"), args.n_samples),
                os.path.join(args.out_dir, "generated_samples.jpg"), os.path.join(args.out_dir, "train_loss.png"))
    for path in (args.checkpoint, plan.samples_path, plan.loss_path):
        check_writable(path)
    return plan


def resume_checkpoint(args):
    """The checkpoint --resume continues, refused if it cannot be resumed or if the flags contradict it."""
    if not os.path.exists(args.checkpoint):
        raise UserError(f"--resume: no checkpoint at {args.checkpoint}; drop --resume to start a new run")
    ckpt = checkpoint.load(args.checkpoint)
    if not checkpoint.is_resumable(ckpt):
        raise UserError(f"--resume: {args.checkpoint} holds weights only (no optimizer state); it cannot be resumed")
    check_resume_args(args, ckpt)
    return ckpt


def check_resume_args(args, ckpt):
    """--resume: the model, the diffusion and the data order come from the checkpoint; explicit
    flags that would change them are refused, naming the difference."""
    saved, diffs = ckpt["model_args"], []
    for flag, key in config.MODEL_FLAGS.items():
        given = getattr(args, flag)
        if given is not None and _norm(given) != _norm(saved[key]):
            diffs.append(f"--{flag} {_norm(given)} but the checkpoint has {_norm(saved[key])}")
    if saved.get("num_classes") is None and (args.class_cond or args.p_uncond is not None):
        diffs.append(f"--{'class_cond' if args.class_cond else 'p_uncond'} but the checkpoint is unconditional")
    for k in ("var_type", "schedule"):
        has = ckpt["diffusion_args"].get(k, config.DEFAULTS[k])  # checkpoints before the cosine schedule: linear
        if getattr(args, k) is not None and getattr(args, k) != has:
            diffs.append(f"--{k} {getattr(args, k)} but the checkpoint has {has}")
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
                                                "save_every", "grad_clip", "p_uncond", "loss_weight", "snr_gamma",
                                                "eval_every", "eval_samples") if getattr(args, k) is not None})
    saved.update(amp=args.amp, compile=args.compile)  # how to run, not what to train: from the flags
    return TrainConfig(**{f.name: saved[f.name] for f in fields(TrainConfig) if f.name in saved})


def protect_existing(path, keep_copy=True):
    """A new run (no --resume) over an existing checkpoint: refuse if that holds an unfinished run,
    else keep it as <path>.prev (written atomically; by one process under torchrun) before this
    run's first save replaces it."""
    if not os.path.exists(path):
        return
    try:
        old = checkpoint.load(path)
    except UserError:
        old = {}
    if checkpoint.is_unfinished(old):
        raise UserError(f"{path} holds an unfinished run (step {old['step']} of {old['total_steps']}); continue it "
                        f"with --resume, or move it away (or pick another --checkpoint) to start a new run")
    if not keep_copy:
        return
    with open(path, "rb") as f:
        data = f.read()
    atomic_write(path + ".prev", lambda f: f.write(data))
    print(f"{path} exists and --resume was not given: starting a new run; the old file is kept as {path}.prev")


def load_data(data_dir, rank, world):
    """MNIST's training images (uint8 (60000, 28, 28)) and labels; under torchrun one process
    per node fetches the data while the others wait."""
    if world > 1 and os.environ.get("LOCAL_RANK") == "0":
        mnist_tensors(data_dir, train=True, verbose=False)
    if world > 1:
        torch.distributed.barrier()
    return mnist_tensors(data_dir, train=True, verbose=rank == 0)


def train(args, plan, model, diffusion, images, labels, device, log):
    """train_func with the plan's settings; a signal stops it with the resume command printed."""
    hint = CPU_HINT if device.type == "cpu" and plan.meta.get("preset") == "paper" else None
    t0 = time.time()
    try:
        rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0  # rank 0 evaluates
        judge = TrainingJudge() if plan.cfg.eval_every and rank0 else None
        state = train_func(model, diffusion, images, plan.cfg, args.checkpoint, device=device, resume=plan.resume,
                           model_meta=plan.meta, progress=not args.no_progress, speed_hint=hint, judge=judge,
                           labels=labels if plan.model_args.get("num_classes") is not None else None)
    except TrainingInterrupted as e:
        log(f"\n{e}. Resume with: {_resume_command(args)}")
        sys.exit(128 + e.signum)  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    if plan.resume is not None and state["step"] == plan.resume["step"]:
        log(f"{args.checkpoint} was already at step {state['step']}: nothing to train (raise --n_epochs or "
            f"--max_steps to train further); sampling from it")
    losses = state["loss_history"]
    log(f"trained to step {state['step']} in {time.time() - t0:.0f} s; final loss {losses[-100:].mean():.4f} "
        f"(mean of the last {min(100, len(losses))} steps); saved {args.checkpoint}")
    return state


def sample_and_plot(args, plan, model, diffusion, state, device):
    """The loss curve, and n_samples digits from the EMA weights with the chosen sampler."""
    plot_loss(state["loss_history"], plan.loss_path, evals=state.get("eval_history"))
    model.load_state_dict(state["ema"])
    t0 = time.time()
    samples, _ = sample_func(model, args.n_samples, diffusion, seed=plan.cfg.seed, device=device,
                             progress=not args.no_progress, amp=args.amp, compile=args.compile,
                             **plan.sampler, **plan.labels)
    save_image_grid(from_model_range(samples), plan.samples_path, nrow=5)
    nfe = network_evaluations(plan.sampler, diffusion.T, plan.labels["guidance_scale"])
    print(f"sampled {args.n_samples} digits ({plan.sampler['sampler']}, NFE {nfe}) in {time.time() - t0:.1f} s; "
          f"wrote {plan.samples_path} and {plan.loss_path}")


def main(argv=None):
    args = get_parser().parse_args(argv)
    device, rank, world = setup_distributed(args.device)  # (device, 0, 1) without torchrun
    log = print if rank == 0 else (lambda *a, **k: None)  # rank 0 prints and writes the outputs
    try:
        plan = configure(args, device, world)
        log("configuration:", json.dumps(plan.summary(args, device, world), indent=1))
        if args.dry_run:
            return
        if plan.resume is None:
            protect_existing(args.checkpoint, keep_copy=rank == 0)
        images, labels = load_data(args.data_dir, rank, world)
        torch.manual_seed(plan.cfg.seed)
        model, diffusion = UNet(**plan.model_args), GaussianDiffusion(**plan.diffusion_args)
        log(f"UNet with {count_parameters(model) / 1e6:.2f}M parameters; {len(images)} training images")
        state = train(args, plan, model, diffusion, images, labels, device, log)
        if rank == 0:
            sample_and_plot(args, plan, model, diffusion, state, device)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def _resume_command(args):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = "python" if world == 1 else f"torchrun --nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', world)}"
    out = ["--resume", "--checkpoint", args.checkpoint]
    for k in ("data_dir", "out_dir", "device", "amp"):
        if getattr(args, k) != get_parser().get_default(k):
            out += [f"--{k}", str(getattr(args, k))]
    return " ".join([launcher, os.path.basename(sys.argv[0])] + out + (["--compile"] if args.compile else []))


if __name__ == "__main__":
    run_main(main)
