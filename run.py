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
from dataclasses import asdict, dataclass

import torch

import checkpoint
import config
import sample
import utils
from config import TrainConfig
from dataloader import mnist_tensors
from diffusion import GaussianDiffusion, from_model_range
from metrics import TrainingJudge
from model import UNet, count_parameters
from sample import check_n_samples, label_kwargs, network_evaluations, sample_func, sampler_kwargs
from train import TrainingInterrupted, train_func
from utils import UserError

CPU_HINT = "On a CPU, 'python run.py --preset cpu' trains a smaller model in about 15 minutes (README)"


def get_parser():
    """Flags that set the model or the recipe default to None: "not given", so that the preset
    (or, with --resume, the checkpoint) supplies the value. Their defaults, help and checks are in config."""
    p = utils.OneLineArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="paper", choices=sorted(config.PRESETS), help="model and recipe defaults")
    p.add_argument("--class_cond", action="store_true",
                   help="class-conditional model for classifier-free guidance (Ho & Salimans 2022)")
    config.add_train_flags(p)
    p.add_argument("--n_samples", type=int, default=10, help="digits to sample after training")
    sample.add_sampler_flags(p)
    sample.add_label_flags(p)
    config.add_speed_flags(p)
    config.add_flag(p, "graph_step")
    config.add_device_flag(p)
    p.add_argument("--data_dir", default="./data", help="where MNIST is (or is put)")
    config.add_checkpoint_flag(p, "checkpoint path (written; read by --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run saved at --checkpoint")
    p.add_argument("--out_dir", default=".", help="where generated_samples.jpg and train_loss.png go")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    p.add_argument("--dry_run", action="store_true", help="print the resolved configuration and exit")
    return p


@dataclass
class Plan:
    """Everything a run uses, resolved and checked before any data is loaded."""
    model_args: dict
    diffusion: GaussianDiffusion
    cfg: TrainConfig
    meta: dict
    resume: dict  # the checkpoint to continue, or None
    sampler: dict  # sample_func's sampler settings
    labels: dict  # sample_func's labels and guidance scale
    samples_path: str
    loss_path: str

    def summary(self, args, device, world):
        return {"preset": self.meta.get("preset"), "device": str(device), "processes": world,
                "model": self.model_args, "train": asdict(self.cfg), "diffusion": self.diffusion.args,
                "n_samples": args.n_samples, "sampler": self.sampler, "guidance_scale": self.labels["guidance_scale"],
                "checkpoint": args.checkpoint, "resume": args.resume, "data_dir": args.data_dir}


def configure(args, device, world):
    """Resolve the preset and the flags (or, with --resume, the checkpoint and the flags) into a Plan;
    every value is checked here, before the data is loaded and before any file is written."""
    utils.check_amp(device, args.amp)
    flags = {k: getattr(args, k, None) for k in config.DEFAULTS}
    if args.resume:
        ckpt = checkpoint.load(args.checkpoint, missing=f"--resume: no checkpoint at {args.checkpoint}; drop "
                                                        "--resume to start a new run")
        model_args, diffusion_args, cfg = config.resolve_resume(ckpt, args.checkpoint, args.class_cond, **flags)
        meta = ckpt.get("meta", {})
    else:
        ckpt, meta = None, {"preset": args.preset}
        model_args, diffusion_args, cfg = config.resolve(args.preset, args.class_cond, **flags)
    diffusion = GaussianDiffusion(**diffusion_args)  # built once: checked here, trained and sampled with below
    check_batch_divides(cfg.batch_size, world)
    if cfg.graph_step and (world > 1 or cfg.amp == "fp16"):
        raise UserError("--graph_step runs in one process and without --amp fp16 (whose GradScaler decides on the "
                        "host whether to skip a step); drop it")
    check_n_samples(args.n_samples)
    plan = Plan(model_args, diffusion, cfg, meta, ckpt, sampler_kwargs(args, diffusion),
                label_kwargs(args, model_args.get("num_classes"), args.n_samples),
                os.path.join(args.out_dir, "generated_samples.jpg"), os.path.join(args.out_dir, "train_loss.png"))
    for path in (args.checkpoint, plan.samples_path, plan.loss_path):
        utils.check_writable(path)
    return plan


def check_batch_divides(batch_size, world):
    """Under torchrun --batch_size is the global batch: each of the `world` processes takes a share."""
    if batch_size % world:
        raise UserError(f"--batch_size {batch_size} is the global batch and must divide evenly over the "
                        f"{world} processes")


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
    utils.atomic_write(path + ".prev", lambda f: f.write(data))
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
        judge = TrainingJudge() if plan.cfg.eval_every and utils.rank_world()[0] == 0 else None  # rank 0 evaluates
        state, ema = train_func(model, diffusion, images, plan.cfg, args.checkpoint, device=device, resume=plan.resume,
                           model_meta=plan.meta, progress=not args.no_progress, speed_hint=hint, judge=judge,
                           labels=labels)  # used by a class-conditional model only
    except TrainingInterrupted as e:
        log(f"\n{e}. Resume with: {_resume_command(args)}")
        sys.exit(128 + e.signum)  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    if plan.resume is not None and state["step"] == plan.resume["step"]:
        log(f"{args.checkpoint} was already at step {state['step']}: nothing to train (raise --n_epochs or "
            f"--max_steps to train further); sampling from it")
    losses = state["loss_history"]
    log(f"trained to step {state['step']} in {time.time() - t0:.0f} s; final loss {losses[-100:].mean():.4f} "
        f"(mean of the last {min(100, len(losses))} steps); saved {args.checkpoint}")
    if summary := checkpoint.training_time(state):  # every session of the run, resumed ones included
        log(summary)
    return state, ema


def sample_and_plot(args, plan, ema, diffusion, state, device):
    """The loss curve, and n_samples digits from the EMA weights with the chosen sampler."""
    utils.plot_loss(state["loss_history"], plan.loss_path, evals=state.get("eval_history"))
    t0 = time.time()
    samples, _ = sample_func(ema, args.n_samples, diffusion, seed=plan.cfg.seed, device=device,
                             progress=not args.no_progress, amp=args.amp, compile=args.compile,
                             **plan.sampler, **plan.labels)
    utils.save_image_grid(from_model_range(samples), plan.samples_path, nrow=5)
    nfe = network_evaluations(plan.sampler, diffusion.T, plan.labels["guidance_scale"])
    print(f"sampled {args.n_samples} digits ({plan.sampler['sampler']}, NFE {nfe}) in {time.time() - t0:.1f} s; "
          f"wrote {plan.samples_path} and {plan.loss_path}")


def main(argv=None):
    args = get_parser().parse_args(argv)
    device, rank, world = utils.setup_distributed(args.device)  # (device, 0, 1) without torchrun
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
        model, diffusion = UNet(**plan.model_args), plan.diffusion
        log(f"UNet with {count_parameters(model) / 1e6:.2f}M parameters; {len(images)} training images")
        state, ema = train(args, plan, model, diffusion, images, labels, device, log)
        if rank == 0:
            sample_and_plot(args, plan, ema, diffusion, state, device)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def _resume_command(args):
    world = utils.rank_world()[1]
    launcher = "python" if world == 1 else f"torchrun --nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', world)}"
    out = ["--resume", "--checkpoint", args.checkpoint]
    for k in ("data_dir", "out_dir", "device", "amp"):
        if getattr(args, k) != get_parser().get_default(k):
            out += [f"--{k}", str(getattr(args, k))]
    return " ".join([launcher, os.path.basename(sys.argv[0])] + out + (["--compile"] if args.compile else []))


if __name__ == "__main__":
    utils.run_main(main)
