"""Sample digits from a trained checkpoint.

    python evaluate.py                                   # ddpm_trained.pt -> generated_samples.jpg
    python evaluate.py --n_samples 100 --save_samples samples.npz
    python evaluate.py --metrics --from_samples samples.npz   # score samples drawn earlier or elsewhere

The checkpoint is self-describing (model and diffusion arguments inside); a bare UNet state
dict is also accepted and built with the default arguments. Sampling uses the EMA weights (`--ema D`:
the stored average of decay D, from a run with --ema_decays).
"""
import json
import time

import numpy as np
import torch

import checkpoint
import config
import sample
import utils
from dataloader import ensure_mnist, mnist_tensors
from diffusion import from_model_range, to_uint8
from metrics import Judge, nll_bpd, sample_metrics
from sample import check_n_samples, label_kwargs, network_evaluations, sample_func, sampler_kwargs
from utils import UserError


def get_parser():
    p = utils.OneLineArgumentParser(description="Sample MNIST digits from a trained DDPM checkpoint.")
    config.add_checkpoint_flag(p, "checkpoint to load")
    p.add_argument("--n_samples", type=int, default=10, help="number of digits to generate")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same digits)")
    config.add_device_flag(p)
    p.add_argument("--batch_size", type=int, default=256, help="samples drawn in parallel")
    p.add_argument("--out", default="generated_samples.jpg", help="sample grid (.jpg or .png)")
    p.add_argument("--nrow", type=int, default=5, help="digits per row of the grid")
    p.add_argument("--save_samples", metavar="PATH.npz",
                   help="also write the samples as uint8 (N, 28, 28), key 'samples'")
    p.add_argument("--no_ema", action="store_true", help="use the raw weights instead of the EMA")
    config.add_ema_flag(p, "sample")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    sample.add_sampler_flags(p)
    sample.add_label_flags(p)
    config.add_speed_flags(p)
    p.add_argument("--metrics", action="store_true", help="judge the samples (feature-FID, precision/recall, "
                   "classifier confidence) and compute the bits/dim bound on MNIST test images")
    p.add_argument("--metrics_out", help="with --metrics: the numbers as JSON (default metrics.json)")
    p.add_argument("--judge", metavar="FILE", help="with --metrics: a judge of your own from 'python metrics.py "
                   "--train_judge' (default: the published checkpoints/mnist_judge.pt); its numbers are labelled local")
    p.add_argument("--data_dir", help="with --metrics: where MNIST is (or is put), as in run.py (default ./data)")
    p.add_argument("--bpd_images", type=int, help="with --metrics: test images for bits/dim (default 128; 0 = skip)")
    p.add_argument("--bpd_timesteps", type=int, help="with --metrics: timesteps per image for bits/dim (default 100; "
                   "T-1 = the exact sum, fewer = a stratified estimate)")
    p.add_argument("--from_samples", metavar="FILE.npz",
                   help="with --metrics: score the samples in FILE.npz (from --save_samples, here or on another "
                        "machine) instead of sampling; bits/dim only if --bpd_images is given (from --checkpoint)")
    return p


METRICS_DEFAULTS = dict(metrics_out="metrics.json", data_dir="./data", bpd_images=128, bpd_timesteps=100)


def check_metrics_args(args):
    """The metrics flags need --metrics (none is silently ignored); fill in their defaults."""
    given = [k for k in (*METRICS_DEFAULTS, "from_samples", "judge") if getattr(args, k) is not None]
    if given and not args.metrics:
        raise UserError(f"--{given[0]} is for --metrics; add --metrics or drop it")
    if args.from_samples is not None:
        if args.save_samples:
            raise UserError("--from_samples scores an existing file; drop --save_samples")
        if args.bpd_images is None:
            args.bpd_images = 0  # bits/dim needs the network: only when asked for
    for k, v in METRICS_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.bpd_images < 0 or args.bpd_timesteps < 1:
        raise UserError("--bpd_images must be >= 0 and --bpd_timesteps >= 1")
    if args.metrics and args.from_samples is None and not 10 <= args.n_samples <= 10000:
        raise UserError(f"--metrics needs 10 <= --n_samples <= 10000 (real sets of the same size are drawn from "
                        f"the 10,000 test images), got {args.n_samples}")


def check_args(args):
    """Every flag, checked before the checkpoint is read and before any sampling."""
    check_n_samples(args.n_samples)
    if args.batch_size < 1 or args.nrow < 1:
        raise UserError(f"--batch_size and --nrow must be >= 1, got {args.batch_size} and {args.nrow}")
    check_metrics_args(args)
    if args.no_ema and args.ema is not None:
        raise UserError("--no_ema samples the raw weights; drop --ema or --no_ema")
    utils.image_format(args.out)
    if args.save_samples and not args.save_samples.endswith(".npz"):
        raise UserError(f"--save_samples must name a .npz file, got {args.save_samples}")
    for path in filter(None, (args.out, args.save_samples, args.metrics_out if args.metrics else None)):
        utils.check_writable(path)


def load(args, device):
    """The model, its diffusion and the sampler and label settings, all checked before sampling."""
    ckpt = checkpoint.load(args.checkpoint)
    lkw = label_kwargs(args, ckpt["model_args"].get("num_classes"), args.n_samples)
    model, diffusion = checkpoint.build_model(ckpt, use_ema=not args.no_ema, device=device,
                                              source=args.checkpoint, ema=args.ema)
    skw = sampler_kwargs(args, diffusion)
    if args.metrics:  # fail before minutes of sampling, not after
        ensure_mnist(args.data_dir)
        args.judge = load_judge(args.judge)
    kind = checkpoint.weights_kind(ckpt, not args.no_ema) + ("" if args.ema is None else f" {args.ema}")
    print(f"loaded {args.checkpoint} (step {ckpt.get('step', '?')}, {kind} weights); sampling {args.n_samples} "
          f"with {skw['sampler']} ({skw.get('sampling_steps', diffusion.T)} steps, "
          f"NFE {network_evaluations(skw, diffusion.T, lkw['guidance_scale'])}) on {device}")
    return model, diffusion, skw, lkw


def read_samples(path):
    """(uint8 samples (N, 28, 28), requested digits (N,), meta dict) from a --save_samples file."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise UserError(f"--from_samples {path} does not exist") from None
    except (OSError, ValueError) as e:
        raise UserError(f"--from_samples {path} is not a readable .npz file ({e})") from None
    s = arrays.get("samples")
    if s is None or s.dtype != np.uint8 or s.ndim != 3 or s.shape[1:] != (28, 28):
        raise UserError(f"--from_samples {path} must hold 'samples', uint8 (N, 28, 28), as --save_samples writes")
    if not 10 <= len(s) <= 10000:
        raise UserError(f"--from_samples {path} holds {len(s)} samples; the metrics need 10 to 10000")
    labels = arrays.get("labels", np.full(len(s), -1))
    meta = json.loads(str(arrays["meta"])) if "meta" in arrays else {}
    return torch.from_numpy(s), torch.as_tensor(labels, dtype=torch.long), meta


def score_samples_file(args):
    """--metrics --from_samples: the metrics of samples drawn earlier, without sampling again."""
    samples, digits, meta = read_samples(args.from_samples)
    args.judge = load_judge(args.judge)
    model, diffusion = (checkpoint.build_model(checkpoint.load(args.checkpoint), use_ema=not args.no_ema,
                                               device=utils.resolve_device(args.device), source=args.checkpoint,
                                               ema=args.ema)
                        if args.bpd_images > 0 else (None, None))
    print(f"scoring {len(samples)} samples from {args.from_samples}" +
          (f" ({', '.join(f'{k} {v}' for k, v in meta.items())})" if meta else ""))
    results = compute_metrics(model, diffusion, samples, args, digits)
    write_metrics(args.metrics_out, {**results, **meta, "from_samples": args.from_samples,
                                     "checkpoint": meta.get("checkpoint")})


def write_metrics(path, results):
    print_table(results)
    utils.atomic_write(path, lambda f: f.write(json.dumps(results, indent=1).encode()))
    print(f"wrote {path}")


def main(argv=None):
    args = get_parser().parse_args(argv)
    check_args(args)
    if args.from_samples is not None:
        return score_samples_file(args)
    device = utils.resolve_device(args.device)
    utils.check_amp(device, args.amp)
    model, diffusion, skw, lkw = load(args, device)
    t0 = time.time()
    samples, _ = sample_func(model, args.n_samples, diffusion, seed=args.seed, device=device,
                             batch_size=args.batch_size, progress=not args.no_progress, amp=args.amp,
                             compile=args.compile, **skw, **lkw)
    sampling_seconds, nfe = time.time() - t0, network_evaluations(skw, diffusion.T, lkw["guidance_scale"])
    digits = requested_digits(lkw["labels"], model, args.n_samples)
    utils.save_image_grid(from_model_range(samples), args.out, nrow=args.nrow)
    if args.save_samples:
        # labels: the requested digit per sample, -1 where none was (unconditional model or sampling)
        meta = dict(checkpoint=args.checkpoint, sampler=skw, guidance_scale=lkw["guidance_scale"], seed=args.seed,
                    nfe=nfe, device=str(device), torch=torch.__version__, cpu=utils.cpu_model(),
                    threads=torch.get_num_threads(), sampling_seconds=round(sampling_seconds, 1),
                    **({} if args.ema is None else {"ema": args.ema}))
        utils.atomic_write(args.save_samples, lambda f: np.savez_compressed(
            f, samples=to_uint8(samples).numpy(), labels=digits.numpy(), meta=np.array(json.dumps(meta))))
    print(f"wrote {args.out}{f' and {args.save_samples}' if args.save_samples else ''} in {time.time() - t0:.1f} s")
    if args.metrics:
        results = compute_metrics(model, diffusion, to_uint8(samples), args, digits)
        write_metrics(args.metrics_out, {**results, "sampler": skw, "guidance_scale": lkw["guidance_scale"],
                                         "sampling_seconds": sampling_seconds, "device": str(device), "nfe": nfe})


def load_judge(path):
    """The metrics' judge (metrics.Judge), checked before any sampling; a local one is announced."""
    judge = Judge(path)
    if not judge.published:
        print(f"note: scoring with a {judge.label}, not the published judge: these numbers are not comparable "
              f"with the README and docs")
    return judge


def requested_digits(labels, model, n):
    """(n,) int64: the digit asked for per sample; -1 for none (unconditional, or the null label)."""
    if labels is None:
        return torch.full((n,), -1, dtype=torch.long)
    return torch.where(labels == model.num_classes, -1, labels)


def compute_metrics(model, diffusion, samples_u8, args, digits):
    t0 = time.time()
    res = sample_metrics(samples_u8, args.data_dir, seed=args.seed, labels=digits if (digits >= 0).any() else None,
                         judge=args.judge)
    res["checkpoint"] = args.checkpoint
    if args.ema is not None:  # which stored EMA (--ema); absent: the main one
        res["ema"] = args.ema
    if args.bpd_images > 0:
        x_test, _ = mnist_tensors(args.data_dir, train=False, verbose=False)
        res["bits_per_dim"] = nll_bpd(model, diffusion, x_test[:args.bpd_images], args.bpd_timesteps,
                                      batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress)
    res["metrics_seconds"] = time.time() - t0
    return res


# (row name, key in the results: the samples' value, key + "_floor" the real images', format)
TABLE_ROWS = (("feature-FID (vs MNIST test)", "fid", ".2f"), ("precision (k=3)", "precision", ".3f"),
              ("recall (k=3)", "recall", ".3f"), ("confident (max softmax >= 0.9)", "confidence", ".3f"),
              ("KL(predicted classes || uniform)", "kl_to_uniform", ".4f"))


def print_table(r):
    """The metrics as a table: each number beside its real-data floor, then the bits/dim bound."""
    n = r["n_samples"]
    print(f"\n{'metric':<34} {'samples':>10} {'real (floor)':>13}   [n = {n}; floor = {n} real images the judge "
          f"never saw: {r['floor_images']}]")
    for name, key, fmt in TABLE_ROWS:
        print(f"{name:<34} {r[key]:>10{fmt}} {r[key + '_floor']:>13{fmt}}")
    print(f"{'predicted-class histogram':<34} {r['class_histogram']}")
    if "conditional_accuracy" in r:
        print(f"{'conditional accuracy':<34} {r['conditional_accuracy']:>10.3f} {r['classifier_test_accuracy']:>13.3f}"
              f"   (classifier agrees with the requested digit; real: its test accuracy)")
        per_digit = [None if a is None else round(a, 3) for a in r["conditional_accuracy_per_digit"]]
        print(f"{'  per digit 0..9':<34} {per_digit}")
    if "bits_per_dim" in r:
        b = r["bits_per_dim"]
        how = "exact sum over t" if b["exact_sum"] else f"stratified, {b['n_timesteps']} t per image"
        print(f"{'NLL bound, bits/dim':<34} {b['bpd']:>10.4f}  +- {b['bpd_se']:.4f} "
              f"(SE; {b['n_images']} test images, {how})")
        print(f"{'  L_T (prior) / L_0 (decoder)':<34} {b['prior']:>10.5f}  / {b['decoder']:.4f}")
        print(f"{'  sum of L_1..L_(T-1)':<34} {b['terms']:>10.4f}")
        for k, v in b["breakdown"].items():
            print(f"{'    ' + k:<34} {v:>10.4f}")
    print(f"{'judge':<34} {r['judge']}, test accuracy {r['classifier_test_accuracy']:.4f}")


if __name__ == "__main__":
    utils.run_main(main)
