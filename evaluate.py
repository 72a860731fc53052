"""Sample digits from a trained checkpoint.

    python evaluate.py                                   # ddpm_trained.pt -> generated_samples.jpg
    python evaluate.py --n_samples 100 --save_samples samples.npz

The checkpoint is self-describing (model and diffusion arguments inside); a bare UNet state
dict is also accepted and built with the default arguments. Sampling uses the EMA weights.
"""
import io
import os
import time

import numpy as np
import torch

from diffusion import from_model_range, to_uint8
from sample import sample_func
from train import build_model, load_checkpoint
from utils import OneLineArgumentParser, UserError, atomic_write, check_writable, resolve_device, run_main, save_image_grid


def get_parser():
    p = OneLineArgumentParser(description="Sample MNIST digits from a trained DDPM checkpoint.")
    p.add_argument("--checkpoint", default="ddpm_trained.pt", help="checkpoint to load")
    p.add_argument("--n_samples", type=int, default=10, help="number of digits to generate")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same digits)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--batch_size", type=int, default=256, help="samples drawn in parallel")
    p.add_argument("--out", default="generated_samples.jpg", help="sample grid (5 per row)")
    p.add_argument("--save_samples", metavar="PATH.npz", help="also write the samples as uint8 (N, 28, 28), key 'samples'")
    p.add_argument("--no_ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def save_npz(path, **arrays):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.n_samples < 1:
        raise UserError(f"--n_samples must be >= 1, got {args.n_samples}")
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.save_samples and not args.save_samples.endswith(".npz"):
        raise UserError(f"--save_samples must name a .npz file, got {args.save_samples}")
    device = resolve_device(args.device)
    for path in filter(None, (args.out, args.save_samples)):
        check_writable(path)
    ckpt = load_checkpoint(args.checkpoint)
    model, diffusion = build_model(ckpt, use_ema=not args.no_ema, device=device)
    weights = "EMA" if not args.no_ema and ckpt.get("ema") is not None else "raw"
    print(f"loaded {args.checkpoint} (step {ckpt.get('step', '?')}, {weights} weights); "
          f"sampling {args.n_samples} with {diffusion.T} steps on {device}")

    t0 = time.time()
    samples, _ = sample_func(model, args.n_samples, diffusion, seed=args.seed, device=device,
                             batch_size=args.batch_size, progress=not args.no_progress)
    save_image_grid(from_model_range(samples), args.out, nrow=5)
    msg = f"wrote {args.out}"
    if args.save_samples:
        save_npz(args.save_samples, samples=to_uint8(samples).numpy())
        msg += f" and {args.save_samples}"
    print(f"{msg} in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    run_main(main)
