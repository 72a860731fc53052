"""Training: Algorithm 1 of Ho et al. 2020 with Adam, warm-up, gradient clipping and an EMA.

`train_func` runs a `Trainer`, whose loop (`Trainer.run`) reads straight down: draw a batch by
index, take one optimizer step on L_simple, update the EMA (and the extra ones of --ema_decays), and
every `save_every` steps write a checkpoint (checkpoint.py) that holds everything resume needs
(weights, EMAs, optimizer, step, random-number states, loss history). The data order is a function of
(seed, epoch), so a resumed run sees exactly the batches it would have seen.
"""
import copy
import math
import signal
import threading
import time
from dataclasses import asdict

import torch
from tqdm.auto import tqdm

import checkpoint
from config import EVAL_SAMPLER, EVAL_SEED
from dataloader import epoch_permutation
from diffusion import to_model_range, to_uint8
from sample import sample_func
from utils import UserError, autocast, cpu_model, git_commit, rank_world


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved at `step`."""

    def __init__(self, step, path, signum):
        super().__init__(f"interrupted by signal {signum} at step {step}; checkpoint saved to {path}")
        self.step, self.path, self.signum = step, path, signum


class TrainingDiverged(UserError):
    pass


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


# ---- the training loop ---------------------------------------------------------------------
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
    memory format). weight: a float, or a device scalar that the whole-step CUDA graph reads at replay."""
    ema_p, model_p = list(ema.parameters()), list(model.parameters())
    if isinstance(weight, torch.Tensor):  # lerp's weight is a host scalar; the same update from device ops
        torch._foreach_add_(ema_p, torch._foreach_mul(torch._foreach_sub(model_p, ema_p), weight))
    else:
        torch._foreach_lerp_(ema_p, model_p, weight)


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


def make_optimizer_and_net(model, device, lr, compile, ddp=False, graphed=False):
    """Adam, and the callable the training step runs (the model itself, or its compiled form).

    With compile on CUDA: channels_last weights and a fused Adam; the paper model at batch 128 is
    launch-bound on a big GPU. graphed (the whole step one CUDA graph, WholeStepGraph): the network
    compiled without CUDA graphs of its own, Adam capturable with its learning rate a device tensor
    (set between replays). Otherwise, on CUDA, the network's own CUDA graphs (mode="reduce-overhead").
    graphed on a CPU (tests): the same tensor learning rate, no capture.
    """
    cuda_compile = compile and device.type == "cuda"
    if cuda_compile:
        model.to(memory_format=torch.channels_last)
    if graphed:
        lr = torch.tensor(lr, dtype=torch.float32, device=device)
    opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True if cuda_compile else None,
                           capturable=graphed and device.type == "cuda")
    net = model
    if ddp:  # gradients are averaged over the processes in backward (PyTorch's DistributedDataParallel)
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if not compile:
        return opt, net
    mode = "reduce-overhead" if cuda_compile and not graphed else None
    return opt, torch.compile(net, mode=mode)  # shares the parameters


def whole_step_graph(cfg, device, world):
    """Whether the training step runs as one captured CUDA graph: on CUDA with --compile, one process, and
    no fp16 GradScaler (its skipped steps need the host). Elsewhere the step runs eagerly."""
    return device.type == "cuda" and cfg.compile and world == 1 and cfg.amp != "fp16"


class WholeStepGraph:
    """The training step (Trainer.step_fn: draws, forward, backward, clipping, Adam, EMA) as one CUDA graph,
    captured on the first step and replayed for every step after it: one launch per step instead of
    hundreds, and no host synchronisation. The step's inputs live in fixed device tensors (the batch's
    indices, the learning rate Adam reads, the EMA weight and one per --ema_decays average) that each call
    refills with kernels.

    torch.compile cannot do this itself: it breaks its graph at draws from a torch.Generator. Here the
    noise generator is registered with the graph, so each replay draws what the eager step would have
    drawn next and advances the generator as it would (a checkpoint's generator state resumes the run).
    The warm-up steps that capture needs (compilation, Adam's state) are undone before capturing: the
    weights, the EMAs, Adam's state and the random states are restored, so capturing changes nothing.
    On a CPU (tests) nothing is captured: the same step runs eagerly on the same device tensors; so it does on
    CUDA, after one warning line, if the capture fails (`error` says why)."""

    def __init__(self, trainer, idx):
        self.tr, dev = trainer, trainer.device
        self.idx, self.w = idx.clone(), torch.zeros((), device=dev)
        self.w_extra = [torch.zeros((), device=dev) for _ in trainer.ema_extra]  # one per --ema_decays average
        self.lr = torch.zeros((), device=dev)
        for group in trainer.opt.param_groups:  # after a resume, load_state_dict replaced the tensor
            group["lr"] = self.lr
        self.graph = self.out = self.error = None
        if dev.type == "cuda":
            saved = self.snapshot()
            try:
                self.capture(saved)
            except Exception as e:  # noqa: BLE001 - whatever torch refuses to capture, the eager step still trains
                self.graph, self.error = None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                self.restore(saved)
                tqdm.write(f"the training step could not be captured as one CUDA graph ({self.error}); "
                           f"it runs eagerly instead")

    def __call__(self, idx, lr, ema_w, extra_w=()):
        self.idx.copy_(idx)
        self.lr.fill_(lr)
        self.w.fill_(ema_w)
        for w, v in zip(self.w_extra, extra_w, strict=True):
            w.fill_(v)
        if self.graph is None:
            return self.tr.step_fn(self.idx, self.w, self.w_extra)
        self.graph.replay()
        return self.out.clone()

    def capture(self, saved):
        tr = self.tr
        side = torch.cuda.Stream(tr.device)
        side.wait_stream(torch.cuda.current_stream(tr.device))
        with torch.cuda.stream(side):
            for _ in range(3):  # compiles the network and creates Adam's state; undone below
                tr.step_fn(self.idx, self.w, self.w_extra)
        torch.cuda.current_stream(tr.device).wait_stream(side)
        self.restore(saved)
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(tr.noise_gen)  # torch's default generator (dropout) is registered anyway
        tr.opt.zero_grad(set_to_none=True)  # the gradients are allocated in the graph's memory
        with torch.cuda.graph(graph):
            self.out = tr.step_fn(self.idx, self.w, self.w_extra)
        self.graph = graph

    def weights(self):
        """The tensors the step writes besides Adam's state: the weights, the EMA and the extra EMAs."""
        return [v for m in (self.tr.model, self.tr.ema, *self.tr.ema_extra.values()) for v in m.state_dict().values()]

    def snapshot(self):
        tr = self.tr
        state = self.weights()
        opt = [v for s in tr.opt.state.values() for v in s.values() if torch.is_tensor(v)]
        return ([t.clone() for t in state], [v.clone() for v in opt] if opt else None,
                tr.noise_gen.get_state(), torch.cuda.get_rng_state(tr.device))

    @torch.no_grad()
    def restore(self, saved):
        tr = self.tr
        state, opt, noise, default = saved
        for live, old in zip(self.weights(), state, strict=True):
            live.copy_(old)
        live_opt = [v for s in tr.opt.state.values() for v in s.values() if torch.is_tensor(v)]
        for i, v in enumerate(live_opt):  # a new run had no state: Adam's first state is all zeros
            if opt is None:
                v.zero_()
            else:
                v.copy_(opt[i])
        tr.noise_gen.set_state(noise)
        torch.cuda.set_rng_state(default, tr.device)


class Trainer:
    """One training run: the network, its EMA (and the extra ones of --ema_decays), the optimizer and the
    random streams, and the methods that advance them. Every method reads and writes only these attributes."""

    def __init__(self, model, diffusion, images, labels, cfg, checkpoint_path, device, meta=None, speed_hint=None,
                 judge=None, graphed=None):
        self.rank, self.world = rank_world()
        self.model, self.diffusion, self.cfg, self.path, self.device = model, diffusion, cfg, checkpoint_path, device
        self.meta, self.speed_hint = meta or {}, speed_hint
        self.graphed = whole_step_graph(cfg, device, self.world) if graphed is None else graphed
        model.to(device).train()
        self.opt, self.net = make_optimizer_and_net(model, device, cfg.lr, cfg.compile, self.world > 1, self.graphed)
        self.ema = copy.deepcopy(model).eval().requires_grad_(False)  # after channels_last: the same memory format
        # --ema_decays: more averages of the same weights with the same warm-up rule, {decay: copy of the network}
        self.ema_extra = {d: copy.deepcopy(model).eval().requires_grad_(False) for d in cfg.ema_decays}
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
        self.check_grads = not self.scaler.is_enabled()  # fp16's GradScaler skips steps with inf gradients by design
        self.noise_gen = torch.Generator(device=device)  # t, noise and label dropout
        # the images in [-1, 1] on the device, converted once: a batch is a gather
        self.images = to_model_range(images.to(device).float() / 255.0).unsqueeze(1)
        self.labels = self._labels(labels, len(images))
        self.graph = None  # the captured step (WholeStepGraph), made on the first step
        B = cfg.batch_size
        self.steps_per_epoch = len(images) // B  # the last partial batch of each epoch is dropped
        if self.steps_per_epoch < 1:
            raise UserError(f"batch size {B} is larger than the {len(images)} training images")
        self.mine = slice(self.rank * (B // self.world), (self.rank + 1) * (B // self.world))  # this process's share
        total = cfg.n_epochs * self.steps_per_epoch
        self.total = min(total, cfg.max_steps) if cfg.max_steps > 0 else total
        self.step, self.losses, self.pending = 0, [], []  # pending: (loss, grad norm) still on the device
        self.saved = False  # has this run written the checkpoint (or resumed from it)?
        self.perm, self.perm_epoch = None, -1
        self.speed_mark, self.speed_reported = None, False  # (step, time, eval seconds) at the first logging point
        self.judge, self.evals, self.eval_seconds = judge, [], 0.0  # --eval_every: the judge and the curve
        if cfg.eval_every and judge is None and self.rank == 0:  # only rank 0 evaluates
            raise ValueError("eval_every needs a judge (metrics.TrainingJudge)")

    def _labels(self, labels, n):
        if getattr(self.model, "num_classes", None) is None:
            return None
        if labels is None or len(labels) != n:
            raise UserError("a class-conditional model needs one label per training image")
        return labels.to(device=self.device, dtype=torch.long)

    def start(self, resume=None):
        """Seed the random streams of a new run, or restore everything from a checkpoint dict."""
        if resume is None:
            torch.manual_seed(self.cfg.seed)  # the dropout stream; the model was initialised by the caller
            self.noise_gen.manual_seed(self.cfg.seed + 1)
        else:
            self._restore(resume)
        # the ledger of the sessions that trained this run: where, how long, which steps
        self.sessions = list((resume or {}).get("sessions", []))
        self.session_mark = (self.step, time.perf_counter())  # this session's evaluations: self.eval_seconds
        gpu = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        self.where = {"cpu": cpu_model(), "device": gpu or self.device.type, "processes": self.world,
                      "torch": str(torch.__version__), "commit": git_commit()}
        if self.world > 1:
            # Dropout: a stream of its own per process (the checkpoint holds rank 0's), so the processes
            # do not repeat each other's masks. With dropout > 0 a distributed run therefore follows
            # its own trajectory, and a resumed one is not bitwise the uninterrupted one.
            torch.manual_seed(self.cfg.seed * 1_000_003 + 7919 * (self.rank + 1) + self.step)

    def _restore(self, ckpt):
        if ckpt.get("device_type", "cpu") != self.device.type:
            raise UserError(f"this run was trained on {ckpt['device_type']}; resume it there (--device "
                            f"{ckpt['device_type']}) so that its random streams can be restored")
        checkpoint.load_weights(self.model, ckpt["model"], "checkpoint")
        checkpoint.load_weights(self.ema, ckpt["ema"], "checkpoint EMA")
        saved = ckpt.get("ema_extra") or {}
        if sorted(saved) != sorted(map(checkpoint.ema_key, self.ema_extra)):
            raise UserError(f"this run tracks the EMAs of --ema_decays {','.join(map(str, self.ema_extra)) or 'none'} "
                            f"but the checkpoint holds {','.join(saved) or 'none'}; resume with the checkpoint's")
        for d, ema in self.ema_extra.items():
            checkpoint.load_weights(ema, saved[checkpoint.ema_key(d)], f"checkpoint EMA {d}")
        own = [{k: g[k] for k in ("lr", "fused", "capturable")} for g in self.opt.param_groups]
        self.opt.load_state_dict(ckpt["optimizer"])
        for group, mine in zip(self.opt.param_groups, own):  # this run's way of stepping, whatever saved it
            group.update(mine)
            on_device = mine["fused"] or mine["capturable"]  # where Adam keeps its step counts
            for p in group["params"]:
                if "step" in self.opt.state.get(p, {}):
                    self.opt.state[p]["step"] = self.opt.state[p]["step"].to(self.device if on_device else "cpu")
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.losses, self.saved = ckpt["step"], ckpt["loss_history"].tolist(), True
        self.evals = list(ckpt.get("eval_history", []))
        checkpoint.set_rng_state(ckpt["rng"])
        self.noise_gen.set_state(ckpt["rng"]["noise"].cpu())

    def state(self):
        """The checkpoint dict of the run as it is now (the format is described in checkpoint.py)."""
        return {"format": checkpoint.FORMAT, "model_args": self.model.model_args, "diffusion_args": self.diffusion.args,
                "train_config": asdict(self.cfg), "meta": self.meta,
                "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "ema_extra": {checkpoint.ema_key(d): e.state_dict() for d, e in self.ema_extra.items()},
                "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "step": self.step, "epoch": self.step // self.steps_per_epoch, "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total, "device_type": self.device.type,
                "loss_history": torch.tensor(self.losses, dtype=torch.float32), "eval_history": list(self.evals),
                "rng": {**checkpoint.rng_state(), "noise": self.noise_gen.get_state()}, "sessions": self.ledger()}

    def ledger(self):
        """The sessions that trained this run, this one last: each one's machine, commit, first and last step,
        and wall seconds from the start of its training loop (evaluations included; eval_seconds of them).
        Metadata only: it changes no weight, so a resumed run still trains bitwise as the uninterrupted one."""
        first, t0 = self.session_mark
        if self.step == first:
            return list(self.sessions)
        return [*self.sessions, {**self.where, "from_step": first, "to_step": self.step,
                                 "seconds": round(time.perf_counter() - t0, 1),
                                 "eval_seconds": round(self.eval_seconds, 1)}]

    def batch(self):
        """This process's share of the global batch at self.step: its indices into the images, on the device."""
        epoch, pos = divmod(self.step, self.steps_per_epoch)
        if epoch != self.perm_epoch:
            perm = epoch_permutation(self.cfg.seed, epoch, len(self.images))
            cuda = self.device.type == "cuda"  # from pinned memory, the copy does not wait for the GPU's queue
            self.perm = (perm.pin_memory() if cuda else perm).to(self.device, non_blocking=cuda)
            self.perm_epoch = epoch
        B = self.cfg.batch_size
        return self.perm[pos * B:(pos + 1) * B][self.mine]

    def step_fn(self, idx, ema_w, extra_w=()):
        """The device work of one training step: the batch, the draws, L_simple (Algorithm 1; or its Min-SNR
        weighting), backward, clipping, Adam, the EMA updates (ema_w: the main one's weight; extra_w: one per
        --ema_decays average; floats, or device scalars on the graphed path). Returns (loss, gradient norm) on
        the device. Nothing in it waits for the host, so on CUDA it is captured as one graph (WholeStepGraph)."""
        cfg, B = self.cfg, self.cfg.batch_size
        x0, y = self.images[idx], None
        if self.labels is not None:  # Ho & Salimans 2022, Algorithm 1: drop the label with probability p_uncond
            drop = (torch.rand(B, device=self.device, generator=self.noise_gen) < cfg.p_uncond)[self.mine]
            y = torch.where(drop, self.model.num_classes, self.labels[idx])
        # Every process draws the whole global batch's t and noise and keeps its share, so the run
        # does not depend on the number of processes.
        t, noise = self.diffusion.draw_t_and_noise((B, *x0.shape[1:]), self.device, x0.dtype, self.noise_gen)
        with autocast(self.device, cfg.amp, cache=not self.graphed):  # no autocast cache in a captured graph
            loss = self.diffusion.training_losses(self.net, x0, y=y, t=t[self.mine], noise=noise[self.mine],
                                                  weight=cfg.loss_weight, gamma=cfg.snr_gamma).mean()
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        # the global gradient norm, clipped at grad_clip (inf = measured only; scaling by 1 is exact)
        clip = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        ema_update(self.ema, self.model, ema_w)
        for ema, w in zip(self.ema_extra.values(), extra_w):  # one foreach update each
            ema_update(ema, self.model, w)
        return torch.stack([loss.detach().float(), gnorm.detach().float()])

    def train_step(self, idx):
        """One optimizer step at the learning rate of self.step, then the EMA updates; the loss and gradient
        norm stay on the device until the next flush."""
        lr, w = lr_at(self.step, self.cfg, self.total), ema_weight(self.cfg.ema_decay, self.step)
        extra = [ema_weight(d, self.step) for d in self.ema_extra]
        if not self.graphed:
            for group in self.opt.param_groups:
                group["lr"] = lr
            out = self.step_fn(idx, w, extra)
        else:  # device scalars, set by kernels: no host synchronisation
            if self.graph is None:
                self.graph = WholeStepGraph(self, idx)
            out = self.graph(idx, lr, w, extra)
        self.pending.append(out)
        self.step += 1

    def flush(self):
        """Move the pending losses to the host (one sync per log_every steps) and stop on a non-finite one."""
        if not self.pending:
            return
        vals = torch.stack(self.pending)
        if self.world > 1:  # the global batch's mean loss; the gradient norm is already the same everywhere
            loss_sum = vals[:, 0].contiguous()  # collectives need contiguous tensors
            torch.distributed.all_reduce(loss_sum)
            vals[:, 0] = loss_sum / self.world
        vals = vals.cpu().tolist()
        for i, (v, gnorm) in enumerate(vals):
            if not math.isfinite(v) or (self.check_grads and not math.isfinite(gnorm)):
                what = f"loss became {v}" if not math.isfinite(v) else f"gradient norm became {gnorm}"
                raise self.diverged(what, self.step - len(vals) + i + 1)
        self.losses.extend(v for v, _ in vals)
        self.pending.clear()

    def diverged(self, what, at):
        kept = (f"the last good checkpoint ({self.path}) was kept" if self.saved
                else f"this run saved nothing; {self.path} is untouched by it")
        return TrainingDiverged(f"{what} at step {at}; stopped, {kept}. Lower --lr or check the data")

    def save(self):
        """Write the checkpoint atomically (rank 0), after checking that the weights are finite."""
        self.flush()
        params = [p for m in (self.model, self.ema, *self.ema_extra.values()) for p in m.parameters()]
        if not torch.stack([p.detach().float().abs().max() for p in params]).isfinite().all():
            raise self.diverged("the weights became non-finite", self.step)
        if self.rank == 0:
            checkpoint.save(self.path, self.state())
        if self.world > 1:  # no process exits (say, on a signal) before the checkpoint is complete
            torch.distributed.barrier()
        self.saved = True

    def evaluate(self):
        """--eval_every: sample eval_samples digits from the (main) EMA weights with config.EVAL_SAMPLER and fixed
        noise, score them with the judge and append {step, fid, confidence, seconds} to the curve (rank 0;
        the others wait at the next collective). It draws from no training stream (the noise comes from
        per-sample generators of its own, the EMA has no dropout), so the run trains bitwise as without it."""
        if self.rank != 0 or (self.evals and self.evals[-1]["step"] == self.step):
            return
        t0 = time.perf_counter()
        n = self.cfg.eval_samples
        labels = None if self.labels is None else torch.arange(n) % self.model.num_classes  # balanced digits
        x, _ = sample_func(self.ema, n, self.diffusion, seed=EVAL_SEED, device=self.device, progress=False,
                           batch_size=n, labels=labels, **EVAL_SAMPLER)
        scores = self.judge(to_uint8(x))
        seconds = time.perf_counter() - t0
        self.eval_seconds += seconds
        self.evals.append({"step": self.step, "fid": scores["fid"], "confidence": scores["confidence"],
                           "seconds": seconds})
        tqdm.write(f"eval at step {self.step}: feature-FID {scores['fid']:.2f}, confident {scores['confidence']:.3f} "
                   f"(n = {n}, {EVAL_SAMPLER['sampler']} at {EVAL_SAMPLER['sampling_steps']} NFE; {seconds:.1f} s)")

    def seconds_per_step(self):
        """Seconds per step from the first logging point to now (set-up, compilation and evaluations left
        out), or None before a step after it."""
        if self.speed_mark is None or self.step <= self.speed_mark[0]:
            return None
        first, t0, e0 = self.speed_mark
        return (time.perf_counter() - t0 - (self.eval_seconds - e0)) / (self.step - first)

    def report_speed(self):
        """At the first logging point, start the clock; at the second, print seconds per step and the
        estimated time of the rest of the run, once (rank 0)."""
        if self.speed_mark is None:
            self.speed_mark = (self.step, time.perf_counter(), self.eval_seconds)
        elif not self.speed_reported and self.rank == 0:
            self.speed_reported, per_step = True, self.seconds_per_step()
            left = per_step * (self.total - self.step)
            eta = f"{left / 3600:.1f} h" if left >= 3600 else f"{left / 60:.1f} min" if left >= 60 else f"{left:.0f} s"
            tqdm.write(f"speed: {per_step:.3f} s/step on {self.device}; the remaining {self.total - self.step:,} "
                       f"steps take about {eta}" + (f". {self.speed_hint}" if self.speed_hint else ""))

    def report_average(self):
        """At the end (or an interruption), rank 0: the time the evaluations took, and steps/s from the
        first logging point (the figure docs/performance.md quotes)."""
        if self.rank == 0 and self.eval_seconds:
            tqdm.write(f"evaluations (--eval_every): {self.eval_seconds:.1f} s in all this session, "
                       f"{100 * self.eval_seconds / (time.perf_counter() - self.t_start):.0f}% of its time")
        if self.rank == 0 and self.seconds_per_step():
            tqdm.write(f"average speed: {1 / self.seconds_per_step():.2f} steps/s over steps {self.speed_mark[0]}-"
                       f"{self.step} on {self.device} (from the first logging point: set-up, compilation and "
                       f"evaluations left out)")

    def run(self, progress=True):
        """Train from self.step to self.total; returns the final checkpoint dict."""
        self.t_start = time.perf_counter()
        bar = tqdm(total=self.total, initial=self.step, desc="training", dynamic_ncols=True,
                   disable=not progress or self.rank != 0)
        with _StopFlag() as stop:
            while self.step < self.total:
                self.train_step(self.batch())
                signum = agreed_signal(stop.signum, self.world, self.step, self.cfg.log_every, self.device)
                if self.step % self.cfg.log_every == 0 or self.step == self.total or signum:
                    self.flush()
                    self.report_speed()
                    bar.set_postfix(epoch=self.step // self.steps_per_epoch, loss=f"{self.losses[-1]:.4f}",
                                    refresh=False)
                bar.update(1)
                if self.cfg.eval_every and (self.step % self.cfg.eval_every == 0 or self.step == self.total):
                    self.evaluate()
                if self.step % self.cfg.save_every == 0 or self.step == self.total or signum:
                    self.save()
                if signum:
                    bar.close()
                    self.report_average()
                    raise TrainingInterrupted(self.step, self.path, signum)
        bar.close()
        self.flush()
        self.report_average()
        return self.state()


def train_func(model, diffusion, images, cfg, checkpoint_path, device="cpu", resume=None,
               model_meta=None, progress=True, labels=None, speed_hint=None, judge=None, graphed=None):
    """Train `model` (eps-prediction) with L_simple on uint8 images (N, 28, 28).

    labels: (N,) digit labels, needed by a class-conditional model (model.num_classes set): each
    is replaced by the null label with probability cfg.p_uncond (classifier-free guidance training).
    resume: a checkpoint dict to continue from (checkpoint.load), or None.
    model_meta: extra entries stored in every checkpoint (e.g. the preset name).
    speed_hint: a sentence printed after the estimated time of the run (e.g. a faster preset).
    judge: a metrics.TrainingJudge, needed with cfg.eval_every > 0.
    graphed: run the step as one CUDA graph (None: where whole_step_graph says; False: the eager step).
    Returns the final checkpoint dict. Raises TrainingInterrupted or TrainingDiverged.
    """
    device = torch.device(device)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if device.type == "cpu":  # bitwise-reproducible resume on CPU
        torch.use_deterministic_algorithms(True)
    try:
        trainer = Trainer(model, diffusion, images, labels, cfg, checkpoint_path, device, model_meta, speed_hint,
                          judge, graphed)
        trainer.start(resume)
        return trainer.run(progress)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
