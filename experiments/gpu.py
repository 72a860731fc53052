"""The paper's model on one CUDA GPU, in one command: which training path is faster, resume on CUDA, as many
training steps as fit a time budget, the exported EMA and 1,000 digits from it.

    python experiments/gpu.py                       # on the GPU machine, from the repo root; results in ./gpu_results
    python experiments/gpu.py --device cpu --tiny   # the dry run on a CPU with a tiny model, in seconds (tests run it)

The paper preset (Ho et al. 2020's model and recipe, batch 128) with --amp bf16 --compile, in this process
(train.train_func; every speed is a steps_per_s of a checkpoint's ledger: from the first logging point,
set-up and compilation left out):
  1. speed: --speed_steps steps on each path from the same initial weights: the default --compile path
     (torch.compile's CUDA graphs of the network, mode "reduce-overhead", the measured one) and
     --graph_step (the whole step as one CUDA graph, cuda_graph.GraphedStep). The run goes on with
     --graph_step only if it ran and was faster; otherwise with the default, saying why.
  2. resume: the chosen path again from the same weights to half of --speed_steps (a checkpoint), then
     resumed from that file by the training run of step 3: its losses up to --speed_steps must match the
     uninterrupted ones of step 1 within RESUME_TOL, 2% relative (bf16 on CUDA; on a CPU they are equal).
  3. train: that run goes on along the paper's schedule (100 epochs, 46,800 steps) until 95% of --budget
     seconds have passed (its set-up and compilation included); then SIGTERM stops it and the checkpoint is
     saved at that step, OUT/ddpm_run.pt (`python run.py --resume --checkpoint OUT/ddpm_run.pt --amp bf16
     --compile` continues it; the learning rate is constant after warm-up, so stopping early is the same as
     asking for fewer steps).
  4. export: its EMA weights in float16 to OUT/ddpm_paper.pt with its .sha256 (as export.py does).
  5. sample: --n_samples digits from the exported file with the recommended sampler (samplers.RECOMMENDED)
     to OUT/samples.npz, to score on any machine with `python evaluate.py --metrics --from_samples FILE.npz`.
Then every figure in OUT/gpu.json, stamped. The test suite on the GPU machine, slow tests included, is
`DDPM_SLOW_TESTS=1 python -m pytest -q tests`.

On a CPU nothing is compiled or captured: both paths run the same step eagerly. MNIST is read from
--data_dir, not downloaded (a machine without internet needs data/MNIST/raw, 53 MB: docs/data.md).
"""
import dataclasses
import os
import signal
import tempfile
import threading

import common  # first: the repo's modules onto sys.path

# isort: split
import torch

import checkpoint
import config
import samplers
from dataloader import mnist_tensors
from diffusion import GaussianDiffusion
from model import UNet
from train import TrainingInterrupted, train_func
from utils import UserError, resolve_device

TINY = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_res=(14,))  # every part of the network, small
# The defaults of the paper-size run and of --tiny; log_every: the logging points (the speed counts from the first)
DEFAULTS = {False: dict(budget=300, speed_steps=300, n_samples=1000, batch_size=128, log_every=25),
            True: dict(budget=0.5, speed_steps=5, n_samples=10, batch_size=8, log_every=2)}
STOP_AT = 0.95  # of --budget: SIGTERM then, so that the last checkpoint is written within the budget
RESUME_TOL = 0.02  # the largest relative difference of a loss after the resume from the uninterrupted run's (bf16)


def train(args, cfg, path, resume=None):
    """train_func on a new network of the preset (seeded as run.py seeds it: the same initial weights every
    time); returns the checkpoint as written to `path`, whose ledger times the steps before the save."""
    torch.manual_seed(cfg.seed)
    train_func(UNet(**args.model_args), GaussianDiffusion(**args.diffusion_args), args.images, cfg, path,
               device=args.device, resume=resume, progress=False)
    return checkpoint.load(path)


def speed_rows(args, tmp):
    """Step 1: {path: its checkpoint after --speed_steps, or the error that stopped --graph_step}."""
    rows = {}
    for path in ("default", "graph_step"):
        cfg = dataclasses.replace(args.cfg, graph_step=path == "graph_step", max_steps=args.speed_steps)
        try:
            rows[path] = train(args, cfg, os.path.join(tmp, f"{path}.pt"))
        except Exception as e:  # noqa: BLE001 - whatever stops --graph_step, the default path trains on
            if path == "default" or isinstance(e, TrainingInterrupted):  # Ctrl-C, or nothing to fall back on
                raise
            rows[path] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return rows


def speed_of(ckpt):
    return ckpt["sessions"][-1]["steps_per_s"]


def choose(rows):
    """(path, why): --graph_step if it ran and was faster than the default path, else the default."""
    graph, default = rows["graph_step"], speed_of(rows["default"])
    if isinstance(graph, str):
        return "default", f"--graph_step failed ({graph}); falling back to the default path"
    if speed_of(graph) > default:
        return "graph_step", f"--graph_step is faster ({speed_of(graph):.2f} against {default:.2f} steps/s)"
    return "default", f"--graph_step is not faster ({speed_of(graph):.2f} against {default:.2f} steps/s); " \
                      "falling back to the default path"


def train_to_budget(args, cfg, half_path):
    """Steps 2-3: resume from the checkpoint at half_path along the paper's schedule, until SIGTERM at STOP_AT
    of --budget makes train_func save its checkpoint and stop. Returns the checkpoint (OUT/ddpm_run.pt)."""
    path, done = os.path.join(args.out, "ddpm_run.pt"), threading.Event()

    def ours(signum, frame):  # SIGTERM outside train_func's loop (before its handler is in place): ignored
        pass

    def stop():  # SIGTERM once the budget is spent and train_func's handler (installed after its set-up) is in place
        done.wait(STOP_AT * args.budget)
        while not done.is_set() and signal.getsignal(signal.SIGTERM) is ours:
            done.wait(0.05)
        if not done.is_set():
            os.kill(os.getpid(), signal.SIGTERM)
    old, timer = signal.signal(signal.SIGTERM, ours), threading.Thread(target=stop, daemon=True)
    timer.start()
    try:
        train(args, dataclasses.replace(cfg, max_steps=0), path, resume=checkpoint.load(half_path))
    except TrainingInterrupted as e:
        if e.signum != signal.SIGTERM:  # Ctrl-C: the checkpoint is saved; stop here
            raise
        print(f"{e} (--budget {args.budget:g} s)", flush=True)
    finally:
        done.set()
        timer.join()  # a SIGTERM it sent reaches `ours`, not the default handler
        signal.signal(signal.SIGTERM, old)
    return checkpoint.load(path)


def resume_difference(reference, resumed, start):
    """The largest relative difference of the resumed run's losses from the uninterrupted ones, from `start`
    to the end of the shorter; None if the resumed run stopped before it had a step to compare."""
    n = min(len(reference), len(resumed))
    if n <= start:
        return None
    a, b = reference[start:n].double(), resumed[start:n].double()
    return float(((b - a).abs() / a.abs()).max())


def export_and_sample(args, ckpt, record):
    """Steps 4-5: the EMA weights in float16 (+ .sha256), then --n_samples digits from that file."""
    exported = os.path.join(args.out, "ddpm_paper.pt")
    _, record["exported_sha256"] = checkpoint.save_published(exported, checkpoint.export(ckpt, "float16"))
    record["samples"] = os.path.join(args.out, "samples.npz")
    common.evaluate("--checkpoint", exported, "--device", args.device, "--n_samples", args.n_samples, "--batch_size",
                    min(args.n_samples, 1000), "--seed", 0, "--no_progress", *samplers.as_flags(samplers.RECOMMENDED),
                    "--out", os.path.join(args.out, "samples.png"), "--save_samples", record["samples"],
                    in_process=True)


def get_args(argv):
    p = common.parser(__doc__)
    p.add_argument("--device", default="auto", help="cuda (default where there is one) or cpu (the dry run)")
    p.add_argument("--tiny", action="store_true", help="a tiny model, batch 8 and small counts: a dry run")
    p.add_argument("--budget", type=float, help="seconds of step 3's training run (default 300; --tiny 0.5)")
    p.add_argument("--speed_steps", type=int, help="steps of each path in step 1 (default 300; --tiny 5)")
    p.add_argument("--n_samples", type=int, help="digits to sample in step 5 (default 1000; --tiny 10)")
    p.add_argument("--data_dir", default="./data", help="where MNIST is")
    p.add_argument("--out", default="./gpu_results", help="results folder (created)")
    args = p.parse_args(argv)
    for k, v in DEFAULTS[args.tiny].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if min(args.budget, args.n_samples) <= 0 or args.speed_steps <= 2 * args.log_every:
        raise UserError(f"--budget and --n_samples must be > 0 and --speed_steps > {2 * args.log_every}")
    args.device = resolve_device(args.device)
    cuda = args.device.type == "cuda"
    args.model_args, args.diffusion_args, args.cfg = config.resolve(
        "paper", amp="bf16" if cuda else "none", compile=cuda, batch_size=args.batch_size, log_every=args.log_every,
        **(TINY if args.tiny else {}))
    return args


def main(argv=None):
    args = get_args(argv)
    os.makedirs(args.out, exist_ok=True)
    common.machine()
    args.images = mnist_tensors(args.data_dir, download=False, verbose=False)[0]  # (60000, 28, 28) uint8
    record = common.stamp({"device": str(args.device), "tiny": args.tiny, "budget": args.budget,
                           "speed_steps": args.speed_steps})
    half = args.speed_steps // 2
    with tempfile.TemporaryDirectory() as tmp:
        rows = speed_rows(args, tmp)
        path, why = choose(rows)
        print(f"training on the {path} path: {why}", flush=True)
        cfg = dataclasses.replace(args.cfg, graph_step=path == "graph_step")
        train(args, dataclasses.replace(cfg, max_steps=half), os.path.join(tmp, "half.pt"))
        ckpt = train_to_budget(args, cfg, os.path.join(tmp, "half.pt"))
    speed = speed_of(ckpt)  # the training run's, from its ledger
    record.update(speed={p: r if isinstance(r, str) else speed_of(r) for p, r in rows.items()}, path=path, why=why,
                  resume_rel_diff=resume_difference(rows[path]["loss_history"], ckpt["loss_history"], half),
                  steps=ckpt["step"], steps_per_s=speed, total_steps=ckpt["total_steps"],
                  projected_minutes=round(ckpt["total_steps"] / speed / 60, 1) if speed else None)
    export_and_sample(args, ckpt, record)
    common.write_json(os.path.join(args.out, "gpu.json"), record)
    print(f"\n{os.path.join(args.out, 'gpu.json')} (resume_rel_diff: at most {RESUME_TOL}; projected_minutes: "
          "the run's total_steps at the training run's steps_per_s):")
    for key, value in record.items():
        print(f"  {key}: {value}")
    if (record["resume_rel_diff"] or 0) > RESUME_TOL:
        raise UserError(f"resume on {args.device}: the losses differ by {record['resume_rel_diff']:.3g} (relative), "
                        f"more than {RESUME_TOL}")


if __name__ == "__main__":
    common.run_main(main)
