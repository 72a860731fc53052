"""Remake the README's pictures from a checkpoint and its loss history.

    python make_pics.py                      # checkpoints/ddpm_trained.pt -> pics/

writes, in --out_dir:
  train loss.png         L_simple per optimizer step (light) and its running mean, log scale
  generated samples.png  --n_samples digits from the 1000-step sampler (Algorithm 2; or --sampler ...), 10 per row
  reverse process.png    x_t at 10 timesteps (columns, t = 1000 ... 0) for the first --n_reverse samples
  generated_samples.jpg  the first 10 of those digits, 5 per row (what evaluate.py writes)
All digits come from one sampling pass with --seed, so the pictures agree with each other.

    python make_pics.py --checkpoint checkpoints/ddpm_cond.pt --guidance_panel 0,0.5,1,2,4

writes only 'guidance.png' for a class-conditional checkpoint: one panel per guidance scale w,
digits 0-9 as rows, --per_digit samples each, all from the same noise (same --seed), so the
panels differ only by w.
"""
import os
import time

import torch

import checkpoint
import config
import sample
import utils
from diffusion import from_model_range
from sample import label_kwargs, network_evaluations, sample_func, sampler_kwargs, valid_guidance_scale
from utils import UserError

# Denser near t = 0, where the digit takes shape.
REVERSE_TIMESTEPS = (1000, 800, 600, 450, 300, 200, 120, 60, 20, 0)  # the columns of 'reverse process.png'


def reverse_timesteps(T):
    """REVERSE_TIMESTEPS for a chain of T steps (the same columns, scaled; unchanged for T = 1000)."""
    return tuple(round(k * T / 1000) for k in REVERSE_TIMESTEPS)


def _figure(n_rows, n_cols, figsize):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(n_rows, n_cols, figsize=figsize, squeeze=False)


def _show(ax, img, title=None, fontsize=9):
    """img: (H, W) in [0, 1], drawn without ticks."""
    ax.imshow(img.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set(xticks=[], yticks=[])
    if title is not None:
        ax.set_title(title, fontsize=fontsize)


def _save_figure(fig, title, path):
    import matplotlib.pyplot as plt
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    utils.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def plot_reverse_process(steps, path, n_rows):
    """steps: {t: (N, 1, H, W) in [-1, 1]} -> a grid, one row per sample, one column per t."""
    ts = sorted(steps, reverse=True)
    fig, axes = _figure(n_rows, len(ts), (1.1 * len(ts), 1.1 * n_rows + 0.4))
    for j, t in enumerate(ts):
        imgs = from_model_range(steps[t][:n_rows]).clamp(0, 1)
        for i in range(n_rows):
            _show(axes[i, j], imgs[i, 0], f"t = {t}" if i == 0 else None)
    _save_figure(fig, "reverse process: x_t from noise (t = 1000) to sample (t = 0)", path)


def plot_guidance_panel(panels, path, per_digit):
    """panels: {w: (10 * per_digit, 1, H, W) in [-1, 1], digit-major} -> one panel per w."""
    fig, axes = _figure(1, len(panels), (0.55 * per_digit * len(panels) + 0.4, 6.2))
    for ax, (w, imgs) in zip(axes[0], panels.items()):
        _show(ax, utils.image_grid(from_model_range(imgs).clamp(0, 1), per_digit), f"w = {w:g}", fontsize=10)
    _save_figure(fig, "classifier-free guidance: digits 0-9 (rows), same noise in every panel", path)


def guidance_panel(args, device):
    try:
        scales = [float(v) for v in args.guidance_panel.split(",") if v.strip()]
    except ValueError:
        scales = []
    if not scales or not all(map(valid_guidance_scale, scales)):
        raise UserError(f"--guidance_panel must be comma-separated guidance scales >= 0, got {args.guidance_panel!r}")
    if args.per_digit < 1:
        raise UserError("--per_digit must be >= 1")
    path = os.path.join(args.out_dir, "guidance.png")
    utils.check_writable(path)
    model, diffusion = checkpoint.build_model(checkpoint.load(args.checkpoint), device=device, source=args.checkpoint)
    if model.num_classes is None:
        raise UserError(f"{args.checkpoint} is unconditional; --guidance_panel needs a checkpoint trained with "
                        f"--class_cond")
    skw = sampler_kwargs(args, diffusion)
    labels = torch.arange(model.num_classes).repeat_interleave(args.per_digit)
    t0 = time.time()
    panels = {w: sample_func(model, len(labels), diffusion, seed=args.seed, device=device, batch_size=args.batch_size,
                             progress=not args.no_progress, labels=labels, guidance_scale=w, **skw)[0] for w in scales}
    print(f"sampled {len(scales)} x {len(labels)} digits ({skw['sampler']}) in {time.time() - t0:.0f} s on {device}")
    plot_guidance_panel(panels, path, args.per_digit)
    print(f"wrote '{path}'")


def main(argv=None):
    p = utils.OneLineArgumentParser(description="Remake the README pictures from a checkpoint and its loss history.")
    config.add_checkpoint_flag(p, "checkpoint (with its loss history)", published=True)
    p.add_argument("--out_dir", default="pics", help="folder for the pictures")
    p.add_argument("--n_samples", type=int, default=100, help="digits in 'generated samples.png'")
    p.add_argument("--n_reverse", type=int, default=8, help="rows of 'reverse process.png'")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--batch_size", type=int, default=100, help="samples drawn in parallel")
    config.add_device_flag(p)
    sample.add_sampler_flags(p)
    sample.add_label_flags(p)
    p.add_argument("--guidance_panel", metavar="W,W,...",
                   help="class-conditional checkpoints: write only 'guidance.png', one panel per guidance scale")
    p.add_argument("--per_digit", type=int, default=4, help="--guidance_panel: samples of each digit per panel")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.n_samples < 10 or not 1 <= args.n_reverse <= args.n_samples or args.batch_size < 1:
        raise UserError("need --n_samples >= 10, 1 <= --n_reverse <= --n_samples and --batch_size >= 1")
    device = utils.resolve_device(args.device)
    if args.guidance_panel is not None:
        return guidance_panel(args, device)
    paths = {n: os.path.join(args.out_dir, n)
             for n in ("train loss.png", "generated samples.png", "reverse process.png", "generated_samples.jpg")}
    for path in paths.values():
        utils.check_writable(path)
    ckpt = checkpoint.load(args.checkpoint)
    if ckpt.get("loss_history") is None or len(ckpt["loss_history"]) == 0:
        raise UserError(f"{args.checkpoint} has no loss history; use a checkpoint written by run.py or export.py")
    model, diffusion = checkpoint.build_model(ckpt, device=device, source=args.checkpoint)
    lkw, skw = label_kwargs(args, model.num_classes, args.n_samples), sampler_kwargs(args, diffusion)

    utils.plot_loss(ckpt["loss_history"], paths["train loss.png"], evals=ckpt.get("eval_history"))
    t0 = time.time()
    samples, steps = sample_func(model, args.n_samples, diffusion, seed=args.seed, device=device,
                                 batch_size=args.batch_size, return_steps=reverse_timesteps(diffusion.T),
                                 progress=not args.no_progress, **lkw, **skw)
    nfe = network_evaluations(skw, diffusion.T, lkw["guidance_scale"])
    print(f"sampled {args.n_samples} digits ({skw['sampler']}, NFE {nfe}) in {time.time() - t0:.0f} s on {device}")
    utils.save_image_grid(from_model_range(samples), paths["generated samples.png"], nrow=10)
    plot_reverse_process(steps, paths["reverse process.png"], args.n_reverse)
    utils.save_image_grid(from_model_range(samples[:10]), paths["generated_samples.jpg"], nrow=5)
    print("wrote " + ", ".join(f"'{p}'" for p in paths.values()))


if __name__ == "__main__":
    with torch.no_grad():
        utils.run_main(main)
