"""Training (Algorithm 1 of Ho et al. 2020) and the self-describing checkpoint format.

The loop reads straight down: draw a batch by index, L_simple, Adam step with warm-up and
gradient clipping, EMA update, and every `save_every` steps an atomic checkpoint that holds
everything resume needs (weights, EMA, optimizer, step, RNG states, loss history). The data
order is a function of (seed, epoch), so a resumed run sees exactly the batches it would have.
"""
import copy
import math
import os
import random
import signal
import threading
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from dataloader import epoch_permutation
from diffusion import GaussianDiffusion, to_model_range
from model import UNet
from utils import UserError, atomic_write, autocast

CHECKPOINT_FORMAT = "ddpm-mnist/1"


@dataclass
class TrainConfig:
    n_epochs: int = 100         # passes over the 60k training images
    max_steps: int = 0          # stop after this many optimizer steps (0 = no limit)
    batch_size: int = 128       # paper: 128
    lr: float = 2e-4            # paper: 2e-4 (CIFAR-10), Adam
    warmup: int = 5000          # linear learning-rate warm-up steps (paper: 5000)
    lr_decay: str = "none"      # "none" (paper: constant after warm-up) or "cosine" (to 0 at the last step)
    grad_clip: float = 1.0      # clip the global gradient norm (paper's code: 1.0)
    ema_decay: float = 0.9999   # paper: 0.9999; warmed up as min(decay, (1+n)/(10+n))
    save_every: int = 1000      # checkpoint every N steps (and at the end)
    log_every: int = 25         # move the loss to the host and check it is finite every N steps
    seed: int = 0               # model init, data order, noise, dropout
    amp: str = "none"           # autocast: "none", "bf16" or "fp16" (fp16 with a GradScaler)
    compile: bool = False       # torch.compile the network for the training step
    p_uncond: float = 0.1       # class-conditional models only: share of labels replaced by the null label


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved at `step`."""

    def __init__(self, step, path, signum):
        super().__init__(f"interrupted by signal {signum} at step {step}; checkpoint saved to {path}")
        self.step, self.path, self.signum = step, path, signum


class TrainingDiverged(UserError):
    pass


# ---- checkpoints ----------------------------------------------------------------------------
def rng_state():
    state = {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": _python_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state():  # as tensors and numbers, so that torch.load(weights_only=True) accepts it
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]


def _python_state():
    version, internal, gauss_next = random.getstate()
    return [version, list(internal), gauss_next]


def save_checkpoint(path, state):
    """Atomically write a checkpoint dict (temporary file, fsync, rename)."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint with weights_only=True (no pickled code can run), with one-line errors.

    Returns a dict with at least model_args, diffusion_args and model (and ema if present).
    A bare UNet state dict is accepted and given the default arguments.
    """
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path} does not exist; train one with 'python run.py' or pass --checkpoint PATH")
    if os.path.isdir(path):
        raise UserError(f"checkpoint {path} is a folder, not a file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure here is the file's fault
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "unsupported global" in str(e).lower():  # a pickled class or function: code could run
            raise UserError(f"{path} holds pickled Python objects, not only tensors; refusing to load it "
                            f"(it could run code). Only load checkpoints you trust") from None
        raise UserError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {msg}") from None
    if isinstance(ckpt, dict) and "model" in ckpt and "model_args" in ckpt:
        return ckpt
    if isinstance(ckpt, dict) and ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        return {"model_args": UNet().model_args, "diffusion_args": GaussianDiffusion().args, "model": ckpt}
    raise UserError(f"{path} is not a DDPM checkpoint (no model weights and arguments found)")


def load_weights(model, state_dict, source):
    """load_state_dict that names the mismatching keys and shapes in a one-line UserError."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for name, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                parts.append(f"{name} ({len(items)}): " + ", ".join(items[:5]) + (", ..." if len(items) > 5 else ""))
        raise UserError(f"{source} does not match the model architecture: " + "; ".join(parts))
    model.load_state_dict(state_dict)


def weights_kind(ckpt, use_ema=True):
    """Which weights build_model(ckpt, use_ema) loads: "EMA" or "raw"."""
    if ckpt.get("weights") == "ema":  # an exported checkpoint: "model" holds the EMA weights
        if not use_ema:
            raise UserError("this checkpoint was exported with the EMA weights only; drop --no_ema "
                            "(the raw weights are in the training checkpoint it came from)")
        return "EMA"
    return "EMA" if use_ema and ckpt.get("ema") is not None else "raw"


def build_model(ckpt, use_ema=True, device="cpu"):
    """Rebuild (UNet, GaussianDiffusion) from a checkpoint dict, with EMA weights if present."""
    try:
        model = UNet(**ckpt["model_args"])
        diffusion = GaussianDiffusion(**ckpt["diffusion_args"])
    except (TypeError, ValueError) as e:
        raise UserError(f"checkpoint arguments are invalid: {e}") from None
    kind = weights_kind(ckpt, use_ema)
    weights = ckpt["ema"] if kind == "EMA" and ckpt.get("ema") is not None else ckpt["model"]
    load_weights(model, weights, "checkpoint")
    return model.to(device).eval(), diffusion


def export_checkpoint(ckpt):
    """The published form of a training checkpoint: the EMA weights in fp32 under "model" (marked
    weights="ema"), the arguments that rebuild the model and the diffusion, the training settings
    and the loss history; no raw weights, optimizer or random-number state (it cannot be resumed)."""
    if ckpt.get("ema") is None and ckpt.get("weights") != "ema":
        raise UserError("this checkpoint has no EMA weights to export")
    weights = ckpt["model"] if ckpt.get("weights") == "ema" else ckpt["ema"]
    out = {"format": ckpt.get("format", CHECKPOINT_FORMAT), "weights": "ema",
           "model": {k: v.float().contiguous() if v.is_floating_point() else v for k, v in weights.items()}}
    for k in ("model_args", "diffusion_args", "train_config", "meta", "step", "epoch", "steps_per_epoch",
              "total_steps", "device_type", "loss_history"):
        if k in ckpt:
            out[k] = ckpt[k]
    return out


def agreed_signal(signum, world, step, every, device):
    """The signal (a number) to stop at after this step, or 0. Under torchrun a signal may reach
    the processes at different steps; they agree (all-reduce, max) every `every` steps, so that
    all stop at the same step and the collectives stay matched."""
    if world == 1:
        return signum or 0
    if step % every:
        return 0
    flag = torch.tensor([signum or 0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item())


def dist_rank_world():
    """(rank, world size) of this process under torchrun; (0, 1) when not distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# ---- the training loop ---------------------------------------------------------------------
def lr_at(step, cfg, total_steps):
    """Learning rate for optimizer step `step` (0-indexed): linear warm-up, then constant or cosine."""
    lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup > 0 else cfg.lr
    if cfg.lr_decay == "cosine" and step >= cfg.warmup:
        progress = (step - cfg.warmup) / max(1, total_steps - cfg.warmup)
        lr *= 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return lr


@torch.no_grad()
def ema_update(ema, model, decay, step):
    """ema <- d * ema + (1 - d) * model, with d = min(decay, (1 + step) / (10 + step)) so that the
    average forgets its random initialisation quickly in short runs."""
    d = min(decay, (1.0 + step) / (10.0 + step))
    ema_p, model_p = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(ema_p, model_p, 1.0 - d)


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the end of the current step."""

    def __init__(self):
        self.signum, self._old = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def make_optimizer_and_net(model, device, lr, compile, ddp=False):
    """Adam, and the callable the training step runs (the model itself, or its compiled form).

    With compile on CUDA: channels_last weights, a fused Adam and CUDA graphs
    (mode="reduce-overhead"): the paper model at batch 128 is launch-bound on a big GPU. A scratch
    timing of the bare step on one H200 gave 79 steps/s for this combination against 31 for a
    plain compile; bench_gpu.sh has yet to confirm it for the full loop.
    """
    cuda_compile = compile and device.type == "cuda"
    if cuda_compile:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True if cuda_compile else None)
    net = model
    if ddp:  # gradients are averaged over the processes in backward (PyTorch's DistributedDataParallel)
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if not compile:
        return opt, net
    return opt, torch.compile(net, mode="reduce-overhead" if cuda_compile else None)  # shares the parameters


def train_func(model, diffusion, images, cfg, checkpoint_path, device="cpu", resume=None,
               model_meta=None, progress=True, labels=None):
    """Train `model` (eps-prediction) with L_simple on uint8 images (N, 28, 28).

    labels: (N,) digit labels, needed by a class-conditional model (model.num_classes set): each
    is replaced by the null label with probability cfg.p_uncond (classifier-free guidance training).

    resume: a checkpoint dict to continue from (see load_checkpoint), or None.
    model_meta: extra entries stored in every checkpoint (e.g. the preset name).
    Returns the final checkpoint dict. Raises TrainingInterrupted or TrainingDiverged.
    """
    device = torch.device(device)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if device.type == "cpu":  # bitwise-reproducible resume on CPU (issue: kill-safe training)
        torch.use_deterministic_algorithms(True)
    try:
        return _train(model, diffusion, images, labels, cfg, checkpoint_path, device, resume, model_meta, progress)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _train(model, diffusion, images, labels, cfg, checkpoint_path, device, resume, model_meta, progress):
    rank, world = dist_rank_world()
    model.to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt, net = make_optimizer_and_net(model, device, cfg.lr, cfg.compile, ddp=world > 1)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    noise_gen = torch.Generator(device=device)
    images = images.to(device)
    n, B = images.shape[0], cfg.batch_size
    null_label = getattr(model, "num_classes", None)
    if null_label is not None:
        if labels is None or len(labels) != n:
            raise UserError("a class-conditional model needs one label per training image")
        labels = labels.to(device=device, dtype=torch.long)
    steps_per_epoch = n // B  # the last partial batch of each epoch is dropped: constant batch size
    if steps_per_epoch < 1:
        raise UserError(f"batch size {B} is larger than the {n} training images")
    if B % world:
        raise UserError(f"--batch_size {B} is the global batch and must divide evenly over the {world} processes")
    mine = slice(rank * (B // world), (rank + 1) * (B // world))  # this process's share of every global batch
    total = cfg.n_epochs * steps_per_epoch
    total = min(total, cfg.max_steps) if cfg.max_steps > 0 else total

    step, losses = 0, []
    if resume is None:
        torch.manual_seed(cfg.seed)  # the dropout stream; the model was initialised by the caller
        noise_gen.manual_seed(cfg.seed + 1)
    else:
        if resume.get("device_type", "cpu") != device.type:
            raise UserError(f"this run was trained on {resume['device_type']}; resume it there (--device "
                            f"{resume['device_type']}) so that its random streams can be restored")
        load_weights(model, resume["model"], "checkpoint")
        load_weights(ema, resume["ema"], "checkpoint EMA")
        opt.load_state_dict(resume["optimizer"])
        if resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        step, losses = resume["step"], resume["loss_history"].tolist()
        set_rng_state(resume["rng"])
        noise_gen.set_state(resume["rng"]["noise"].cpu())
    if world > 1:
        # Dropout: a stream of its own per process (the checkpoint holds rank 0's), so the processes
        # do not repeat each other's masks. With dropout > 0 a distributed run therefore follows
        # its own trajectory, and a resumed one is not bitwise the uninterrupted one.
        torch.manual_seed(cfg.seed * 1_000_003 + 7919 * (rank + 1) + step)

    def state():
        return {"format": CHECKPOINT_FORMAT, "model_args": model.model_args, "diffusion_args": diffusion.args,
                "train_config": asdict(cfg), "meta": model_meta or {},
                "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "step": step, "epoch": step // steps_per_epoch, "steps_per_epoch": steps_per_epoch,
                "total_steps": total, "device_type": device.type,
                "loss_history": torch.tensor(losses, dtype=torch.float32),
                "rng": {**rng_state(), "noise": noise_gen.get_state()}}

    pending = []  # per-step (loss, grad norm) still on the device: one host sync per log_every steps
    check_grads = not scaler.is_enabled()  # fp16's GradScaler skips steps with inf gradients by design
    saved_by_this_run = [resume is not None]

    def diverged(what, at):
        kept = (f"the last good checkpoint ({checkpoint_path}) was kept" if saved_by_this_run[0]
                else f"this run saved nothing; {checkpoint_path} is untouched by it")
        return TrainingDiverged(f"{what} at step {at}; stopped, {kept}. Lower --lr or check the data")

    def flush():
        if not pending:
            return
        vals = torch.stack(pending)
        if world > 1:  # the global batch's mean loss; the gradient norm is already the same everywhere
            loss_sum = vals[:, 0].contiguous()  # collectives need contiguous tensors
            torch.distributed.all_reduce(loss_sum)
            vals[:, 0] = loss_sum / world
        vals = vals.cpu().tolist()
        for i, (v, gnorm) in enumerate(vals):
            if not math.isfinite(v) or (check_grads and not math.isfinite(gnorm)):
                what = f"loss became {v}" if not math.isfinite(v) else f"gradient norm became {gnorm}"
                raise diverged(what, step - len(vals) + i + 1)
        losses.extend(v for v, _ in vals)
        pending.clear()

    def save():
        flush()
        params = list(model.parameters()) + list(ema.parameters())
        if not torch.stack([p.detach().float().abs().max() for p in params]).isfinite().all():
            raise diverged("the weights became non-finite", step)
        if rank == 0:
            save_checkpoint(checkpoint_path, state())
        if world > 1:  # no process exits (say, on a signal) before the checkpoint is complete
            torch.distributed.barrier()
        saved_by_this_run[0] = True

    bar = tqdm(total=total, initial=step, desc="training", disable=not progress or rank != 0, dynamic_ncols=True)
    perm, perm_epoch = None, -1
    with _StopFlag() as stop:
        while step < total:
            epoch, pos = divmod(step, steps_per_epoch)
            if epoch != perm_epoch:
                perm, perm_epoch = epoch_permutation(cfg.seed, epoch, n).to(device), epoch
            idx = perm[pos * B:(pos + 1) * B][mine]  # all of the global batch with one process
            x0 = to_model_range(images[idx].float() / 255.0).unsqueeze(1)  # (B / world, 1, 28, 28)

            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg, total)
            y = None
            if null_label is not None:  # Ho & Salimans 2022, Algorithm 1: drop the label with probability p_uncond
                drop = (torch.rand(B, device=device, generator=noise_gen) < cfg.p_uncond)[mine]
                y = torch.where(drop, null_label, labels[idx])
            # Every process draws the whole global batch's t and noise and keeps its share, so the run
            # does not depend on the number of processes.
            t, noise = diffusion.draw_t_and_noise((B, *x0.shape[1:]), device, x0.dtype, noise_gen)
            with autocast(device, cfg.amp):
                loss = diffusion.training_losses(net, x0, y=y, t=t[mine], noise=noise[mine]).mean()
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            # the global gradient norm, clipped at grad_clip (inf = measured only; scaling by 1 is exact)
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            scaler.step(opt)
            scaler.update()
            ema_update(ema, model, cfg.ema_decay, step)
            pending.append(torch.stack([loss.detach().float(), gnorm.detach().float()]))
            step += 1
            signum = agreed_signal(stop.signum, world, step, cfg.log_every, device)

            if step % cfg.log_every == 0 or step == total or signum:
                flush()
                bar.set_postfix(epoch=step // steps_per_epoch, loss=f"{losses[-1]:.4f}", refresh=False)
            bar.update(1)
            if step % cfg.save_every == 0 or step == total or signum:
                save()
            if signum:
                bar.close()
                raise TrainingInterrupted(step, checkpoint_path, signum)
    bar.close()
    flush()
    return state()
