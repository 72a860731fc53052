"""Training: Algorithm 1 of Ho et al. 2020 with Adam, warm-up, gradient clipping and an EMA.

`train_func` reads straight down: set up the network, its EMAs, Adam and the random streams (or
restore them from a checkpoint), then loop: take the batch by index, one optimizer step on L_simple
(`make_step`), the EMA updates, and every few steps move the losses to the host, judge the EMA
(--eval_every) and write a checkpoint (checkpoint.py) that holds everything resume needs. The data
order is a function of (seed, epoch), so a resumed run sees exactly the batches it would have seen.
"""
import copy
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

import checkpoint
from dataloader import epoch_permutation
from diffusion import to_model_range, to_uint8
from sample import sample_func
from samplers import EVAL_SAMPLER, EVAL_SEED
from utils import UserError, autocast, cpu_model, git_commit, rank_world


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved at `step`."""

    def __init__(self, step, path, signum):
        super().__init__(f"interrupted by signal {signum} at step {step}; checkpoint saved to {path}")
        self.step, self.path, self.signum = step, path, signum


class TrainingDiverged(UserError):
    pass


# ---- the learning rate and the EMA ------------------------------------------------------------
def lr_at(step, cfg, total_steps):
    """Learning rate for optimizer step `step` (0-indexed): linear warm-up, then constant or cosine."""
    lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup > 0 else cfg.lr
    if cfg.lr_decay == "cosine" and step >= cfg.warmup:
        progress = (step - cfg.warmup) / max(1, total_steps - cfg.warmup)
        lr *= 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return lr


def ema_weight(decay, step):
    """1 - d: the EMA's step toward the model, with d = min(decay, (1 + step) / (10 + step)) so that the
    average forgets its random initialisation quickly in short runs."""
    return 1.0 - min(decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def ema_update(ema, model, weight):
    """ema <- ema + weight * (model - ema), one foreach kernel over the parameters (the two copies share a
    memory format). weight: a float, or a device scalar (cuda_graph.GraphedStep refills it between replays)."""
    ema_p, model_p = list(ema.parameters()), list(model.parameters())
    if isinstance(weight, torch.Tensor):  # lerp's weight is a host scalar; the same update from device ops
        torch._foreach_add_(ema_p, torch._foreach_mul(torch._foreach_sub(model_p, ema_p), weight))
    else:
        torch._foreach_lerp_(ema_p, model_p, weight)


# ---- the step ----------------------------------------------------------------------------------
def make_optimizer(model, device, cfg, ddp=False):
    """Adam, and the network the step calls (the model itself, its DDP wrapper or its compiled form).

    With --compile on CUDA: channels_last weights, a fused Adam and torch.compile's own CUDA graphs of the
    network (mode "reduce-overhead"), the measured path. With --graph_step the network is compiled without
    graphs of its own and Adam reads its learning rate from a device tensor: cuda_graph.GraphedStep captures
    the whole step instead. On a CPU neither captures anything; --graph_step's device-scalar EMA update
    (sub, mul, add instead of lerp) agrees with the eager one to float32 rounding (tests/test_device_step.py).
    """
    cuda_compile = cfg.compile and device.type == "cuda"
    if cuda_compile:
        model.to(memory_format=torch.channels_last)
    lr = torch.tensor(cfg.lr, dtype=torch.float32, device=device) if cfg.graph_step else cfg.lr
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True if cuda_compile else None,
                           capturable=cfg.graph_step and device.type == "cuda")
    net = model
    if ddp:  # gradients are averaged over the processes in backward (PyTorch's DistributedDataParallel)
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net, mode="reduce-overhead" if cuda_compile and not cfg.graph_step else None)
    return opt, net


def make_step(run, net, diffusion, cfg, images, labels, mine):
    """The device work of one training step, as step(idx, lr, ema_weights) -> (loss, gradient norm) on the
    device: the batch by index, the draws, L_simple (Algorithm 1; or its Min-SNR weighting), backward,
    clipping, Adam, and one EMA update per average in run.emas. Nothing in it waits for the host, so a
    wrapper can capture it as one CUDA graph (cuda_graph.GraphedStep). images: (N, 1, 28, 28) in [-1, 1]
    on the device; labels: (N,) or None; mine: this process's share of the global batch."""
    B, model = cfg.batch_size, run.model
    clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf  # inf: measured only (scaling by 1 is exact)

    def step(idx, lr, ema_weights):
        for group in run.opt.param_groups:
            group["lr"] = lr
        x0, y = images[idx], None
        if labels is not None:  # Ho & Salimans 2022, Algorithm 1: drop the label with probability p_uncond
            drop = (torch.rand(B, device=x0.device, generator=run.noise_gen) < cfg.p_uncond)[mine]
            y = torch.where(drop, model.num_classes, labels[idx])
        # Every process draws the whole global batch's t and noise and keeps its share, so the run
        # does not depend on the number of processes.
        t, noise = diffusion.draw_t_and_noise((B, *x0.shape[1:]), x0.device, x0.dtype, run.noise_gen)
        with autocast(x0.device, cfg.amp, cache=not cfg.graph_step):  # no autocast cache in a captured graph
            loss = diffusion.training_losses(net, x0, y=y, t=t[mine], noise=noise[mine],
                                             weight=cfg.loss_weight, gamma=cfg.snr_gamma).mean()
        run.opt.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(run.opt)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)  # the global gradient norm
        run.scaler.step(run.opt)
        run.scaler.update()
        for ema, w in zip(run.emas.values(), ema_weights, strict=True):  # one foreach update each
            ema_update(ema, model, w)
        return torch.stack([loss.detach().float(), gnorm.detach().float()])
    return step


# ---- the state a checkpoint holds ---------------------------------------------------------------
@dataclass
class Run:
    """What a checkpoint saves and --resume restores: the network, its EMAs ({decay: copy}, --ema_decay's
    first, then --ema_decays'), Adam, the fp16 GradScaler, the noise stream (t, noise, label dropout), the
    step and the histories. The loop reads and writes these; the functions below save and restore them."""
    model: torch.nn.Module
    emas: dict
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    noise_gen: torch.Generator
    step: int = 0
    losses: list = field(default_factory=list)
    evals: list = field(default_factory=list)  # the --eval_every curve
    sessions: list = field(default_factory=list)  # the ledger of the earlier sessions


def restore(run, ckpt, device):
    """Load everything a resumed run continues from: weights, EMAs, Adam, the scaler and the random streams."""
    if ckpt.get("device_type", "cpu") != device.type:
        raise UserError(f"this run was trained on {ckpt['device_type']}; resume it there (--device "
                        f"{ckpt['device_type']}) so that its random streams can be restored")
    main, *extra = run.emas
    saved = ckpt.get("ema_extra") or {}
    if sorted(saved) != sorted(map(checkpoint.ema_key, extra)):
        raise UserError(f"this run tracks the EMAs of --ema_decays {','.join(map(str, extra)) or 'none'} "
                        f"but the checkpoint holds {','.join(saved) or 'none'}; resume with the checkpoint's")
    checkpoint.load_weights(run.model, ckpt["model"], "checkpoint")
    checkpoint.load_weights(run.emas[main], ckpt["ema"], "checkpoint EMA")
    for d in extra:
        checkpoint.load_weights(run.emas[d], saved[checkpoint.ema_key(d)], f"checkpoint EMA {d}")
    own = [{k: g[k] for k in ("lr", "fused", "capturable")} for g in run.opt.param_groups]
    run.opt.load_state_dict(ckpt["optimizer"])
    for group, mine in zip(run.opt.param_groups, own):  # this run's way of stepping, whatever saved it
        group.update(mine)
        on_device = mine["fused"] or mine["capturable"]  # where Adam keeps its step counts
        for p in group["params"]:
            if "step" in run.opt.state.get(p, {}):
                run.opt.state[p]["step"] = run.opt.state[p]["step"].to(device if on_device else "cpu")
    if ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])
    run.step, run.losses, run.evals = ckpt["step"], ckpt["loss_history"].tolist(), list(ckpt.get("eval_history", []))
    run.sessions = list(ckpt.get("sessions", []))
    checkpoint.set_rng_state(ckpt["rng"])
    run.noise_gen.set_state(ckpt["rng"]["noise"].cpu())


def checkpoint_dict(run, cfg, diffusion, meta, steps_per_epoch, total, device, session):
    """The checkpoint of the run as it is now (the format is described in checkpoint.py)."""
    main, *extra = run.emas
    return {"format": checkpoint.FORMAT, "model_args": run.model.model_args, "diffusion_args": diffusion.args,
            "train_config": asdict(cfg), "meta": meta, "model": run.model.state_dict(),
            "ema": run.emas[main].state_dict(),
            "ema_extra": {checkpoint.ema_key(d): run.emas[d].state_dict() for d in extra},
            "optimizer": run.opt.state_dict(), "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
            "step": run.step, "epoch": run.step // steps_per_epoch, "steps_per_epoch": steps_per_epoch,
            "total_steps": total, "device_type": device.type,
            "loss_history": torch.tensor(run.losses, dtype=torch.float32), "eval_history": list(run.evals),
            "rng": {**checkpoint.rng_state(), "noise": run.noise_gen.get_state()},
            "sessions": session.ledger(run)}


class Session:
    """This process's share of the run, for the ledger and the speed lines: where it runs, the step and time
    it started at, the seconds its evaluations took, and the clock from the first logging point (so that
    set-up and compilation are left out of the speed)."""

    def __init__(self, device, world, step):
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        self.where = {"cpu": cpu_model(), "device": gpu or device.type, "processes": world,
                      "torch": str(torch.__version__), "commit": git_commit()}
        self.first_step, self.t0 = step, time.perf_counter()
        self.eval_seconds, self.mark, self.reported = 0.0, None, False

    def seconds_per_step(self, step):
        """From the first logging point to now, evaluations left out; None before a step after it."""
        if self.mark is None or step <= self.mark[0]:
            return None
        first, t0, e0 = self.mark
        return (time.perf_counter() - t0 - (self.eval_seconds - e0)) / (step - first)

    def ledger(self, run):
        """The sessions that trained this run, this one last: each one's machine, commit, first and last step,
        wall seconds from the start of its training loop (evaluations included; eval_seconds of them) and
        steps_per_s from its first logging point. Metadata only: resume stays bitwise."""
        if run.step == self.first_step:
            return list(run.sessions)
        per_step = self.seconds_per_step(run.step)
        return [*run.sessions, {**self.where, "from_step": self.first_step, "to_step": run.step,
                                "seconds": round(time.perf_counter() - self.t0, 1),
                                "eval_seconds": round(self.eval_seconds, 1),
                                "steps_per_s": round(1 / per_step, 3) if per_step else None}]

    def report_speed(self, step, total, device, hint):
        """At the first logging point, start the clock; at the second, print seconds per step and the
        estimated time of the rest of the run, once."""
        if self.mark is None:
            self.mark = (step, time.perf_counter(), self.eval_seconds)
            return
        if self.reported:
            return
        self.reported, per_step = True, self.seconds_per_step(step)
        left = per_step * (total - step)
        eta = f"{left / 3600:.1f} h" if left >= 3600 else f"{left / 60:.1f} min" if left >= 60 else f"{left:.0f} s"
        tqdm.write(f"speed: {per_step:.3f} s/step on {device}; the remaining {total - step:,} steps take about "
                   f"{eta}" + (f". {hint}" if hint else ""))

    def report_average(self, step, device):
        """At the end (or an interruption): the evaluations' time, and steps/s from the first logging point."""
        if self.eval_seconds:
            tqdm.write(f"evaluations (--eval_every): {self.eval_seconds:.1f} s in all this session, "
                       f"{100 * self.eval_seconds / (time.perf_counter() - self.t0):.0f}% of its time")
        if self.seconds_per_step(step):
            tqdm.write(f"average speed: {1 / self.seconds_per_step(step):.2f} steps/s over steps {self.mark[0]}-"
                       f"{step} on {device} (from the first logging point: set-up, compilation and "
                       f"evaluations left out)")


# ---- the loop's helpers: signals, losses, saving, evaluation -----------------------------------
class StopFlag:
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


def flush(run, pending, world, check_grads, diverged):
    """Move the pending (loss, grad norm) pairs to the host (one sync per log_every steps) and stop on a
    non-finite one (fp16's GradScaler skips steps with inf gradients by design: check_grads False)."""
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
            raise diverged(what, run.step - len(vals) + i + 1)
    run.losses.extend(v for v, _ in vals)
    pending.clear()


def save(path, state, run, rank, world, diverged):
    """Write the checkpoint atomically (rank 0), after checking that the weights are finite."""
    params = [p for m in (run.model, *run.emas.values()) for p in m.parameters()]
    if not torch.stack([p.detach().float().abs().max() for p in params]).isfinite().all():
        raise diverged("the weights became non-finite", run.step)
    if rank == 0:
        checkpoint.save(path, state)
    if world > 1:  # no process exits (say, on a signal) before the checkpoint is complete
        torch.distributed.barrier()


def evaluate(run, ema, diffusion, judge, n, device, num_classes):
    """--eval_every: sample n digits from the main EMA with samplers.EVAL_SAMPLER and fixed noise, score
    them with the judge and append {step, fid, confidence, seconds} to the curve. It draws from no training
    stream (per-sample generators of its own; the EMA has no dropout), so the run trains bitwise as without
    it. Returns the seconds it took."""
    if run.evals and run.evals[-1]["step"] == run.step:
        return 0.0
    t0 = time.perf_counter()
    labels = None if num_classes is None else torch.arange(n) % num_classes  # balanced digits
    x, _ = sample_func(ema, n, diffusion, seed=EVAL_SEED, device=device, progress=False, batch_size=n,
                       labels=labels, **EVAL_SAMPLER)
    scores = judge(to_uint8(x))
    seconds = time.perf_counter() - t0
    run.evals.append({"step": run.step, "fid": scores["fid"], "confidence": scores["confidence"], "seconds": seconds})
    tqdm.write(f"eval at step {run.step}: feature-FID {scores['fid']:.2f}, confident {scores['confidence']:.3f} "
               f"(n = {n}, {EVAL_SAMPLER['sampler']} at {EVAL_SAMPLER['sampling_steps']} NFE; {seconds:.1f} s)")
    return seconds


def batch_indices(perm_cache, cfg, step, steps_per_epoch, n_images, mine, device):
    """This process's share of the global batch at `step`: its indices into the images, on the device. The
    epoch's permutation (dataloader.epoch_permutation) is made once per epoch and kept in perm_cache."""
    epoch, pos = divmod(step, steps_per_epoch)
    if perm_cache.get("epoch") != epoch:
        cuda = device.type == "cuda"  # from pinned memory, the copy does not wait for the GPU's queue
        perm = epoch_permutation(cfg.seed, epoch, n_images)
        perm_cache.update(epoch=epoch, perm=(perm.pin_memory() if cuda else perm).to(device, non_blocking=cuda))
    B = cfg.batch_size
    return perm_cache["perm"][pos * B:(pos + 1) * B][mine]


# ---- Algorithm 1 ---------------------------------------------------------------------------------
def train_func(model, diffusion, images, cfg, checkpoint_path, device="cpu", resume=None,
               model_meta=None, progress=True, labels=None, speed_hint=None, judge=None):
    """Train `model` (eps- or v-prediction) with L_simple on uint8 images (N, 28, 28).

    labels: (N,) digit labels, needed by a class-conditional model (model.num_classes set): each
    is replaced by the null label with probability cfg.p_uncond (classifier-free guidance training).
    resume: a checkpoint dict to continue from (checkpoint.load), or None.
    model_meta: extra entries stored in every checkpoint (e.g. the preset name).
    speed_hint: a sentence printed after the estimated time of the run (e.g. a faster preset).
    judge: a metrics.TrainingJudge, needed with cfg.eval_every > 0 (on rank 0, the one that evaluates).
    Returns (the final checkpoint dict, the main EMA network). Raises TrainingInterrupted or TrainingDiverged.
    """
    device, (rank, world) = torch.device(device), rank_world()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if device.type == "cpu":  # bitwise-reproducible resume on CPU
        torch.use_deterministic_algorithms(True)
    try:
        return _train(model, diffusion, images, labels, cfg, checkpoint_path, device, rank, world, resume,
                      model_meta or {}, progress and rank == 0, speed_hint, judge)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _train(model, diffusion, images, labels, cfg, path, device, rank, world, resume, meta, progress, hint, judge):
    steps_per_epoch = len(images) // cfg.batch_size  # the last partial batch of each epoch is dropped
    if steps_per_epoch < 1:
        raise UserError(f"batch size {cfg.batch_size} is larger than the {len(images)} training images")
    total = min(cfg.n_epochs * steps_per_epoch, cfg.max_steps or math.inf)
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and (labels is None or len(labels) != len(images)):
        raise UserError("a class-conditional model needs one label per training image")
    if cfg.eval_every and judge is None and rank == 0:
        raise ValueError("eval_every needs a judge (metrics.TrainingJudge)")

    # set-up: the network, its EMAs (after channels_last: the same memory format), Adam, the random streams
    model.to(device).train()
    opt, net = make_optimizer(model, device, cfg, ddp=world > 1)
    emas = {d: copy.deepcopy(model).eval().requires_grad_(False) for d in (cfg.ema_decay, *cfg.ema_decays)}
    run = Run(model, emas, opt, torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16"),
              torch.Generator(device=device))
    if resume is None:
        torch.manual_seed(cfg.seed)  # the dropout stream; the model was initialised by the caller
        run.noise_gen.manual_seed(cfg.seed + 1)
    else:
        restore(run, resume, device)
    if world > 1:
        # Dropout: a stream of its own per process (the checkpoint holds rank 0's), so the processes
        # do not repeat each other's masks. With dropout > 0 a distributed run therefore follows
        # its own trajectory, and a resumed one is not bitwise the uninterrupted one.
        torch.manual_seed(cfg.seed * 1_000_003 + 7919 * (rank + 1) + run.step)
    x_all = to_model_range(images.to(device).float() / 255.0).unsqueeze(1)  # converted once: a batch is a gather
    y_all = None if num_classes is None else labels.to(device=device, dtype=torch.long)
    mine = slice(rank * (cfg.batch_size // world), (rank + 1) * (cfg.batch_size // world))  # this process's share
    step_fn = make_step(run, net, diffusion, cfg, x_all, y_all, mine)
    if cfg.graph_step:
        from cuda_graph import GraphedStep
        step_fn = GraphedStep(step_fn, [model, *emas.values()], opt, run.noise_gen, device, len(emas))

    session, saved, pending, perms = Session(device, world, run.step), resume is not None, [], {}
    check_grads = not run.scaler.is_enabled()  # fp16's GradScaler skips steps with inf gradients by design
    final = None  # the checkpoint dict of the last save: at the end, what the file holds

    def state():
        return checkpoint_dict(run, cfg, diffusion, meta, steps_per_epoch, total, device, session)

    def diverged(what, at):
        kept = (f"the last good checkpoint ({path}) was kept" if saved
                else f"this run saved nothing; {path} is untouched by it")
        return TrainingDiverged(f"{what} at step {at}; stopped, {kept}. Lower --lr or check the data")

    bar = tqdm(total=total, initial=run.step, desc="training", dynamic_ncols=True, disable=not progress)
    with StopFlag() as stop:
        while run.step < total:
            idx = batch_indices(perms, cfg, run.step, steps_per_epoch, len(images), mine, device)
            lr, ema_ws = lr_at(run.step, cfg, total), [ema_weight(d, run.step) for d in emas]
            pending.append(step_fn(idx, lr, ema_ws))  # (loss, grad norm), still on the device
            run.step += 1
            bar.update(1)
            last, signum = run.step == total, agreed_signal(stop.signum, world, run.step, cfg.log_every, device)
            if run.step % cfg.log_every == 0 or last or signum:
                flush(run, pending, world, check_grads, diverged)
                if rank == 0:
                    session.report_speed(run.step, total, device, hint)
                bar.set_postfix(epoch=run.step // steps_per_epoch, loss=f"{run.losses[-1]:.4f}", refresh=False)
            if cfg.eval_every and (run.step % cfg.eval_every == 0 or last) and rank == 0:
                session.eval_seconds += evaluate(run, emas[cfg.ema_decay], diffusion, judge, cfg.eval_samples,
                                                 device, num_classes)
            if run.step % cfg.save_every == 0 or last or signum:
                flush(run, pending, world, check_grads, diverged)
                final = state()
                save(path, final, run, rank, world, diverged)
                saved = True
            if signum:
                bar.close()
                if rank == 0:
                    session.report_average(run.step, device)
                raise TrainingInterrupted(run.step, path, signum)
    bar.close()  # the last step saved (and so flushed): nothing is pending
    if rank == 0:
        session.report_average(run.step, device)
    return (final if final is not None else state()), emas[cfg.ema_decay]
