"""Throughput of training and sampling for a preset, device and batch size: the one timing tool.

    python experiments/benchmark.py --preset cpu --batch_size 128
    python experiments/benchmark.py --preset paper --device cuda --amp bf16 --compile --json bench.json
    python experiments/benchmark.py --preset cpu --sample_only --compile   # sampling alone, compiled

Reports: the bare training step (train.make_step, the repo's step: the batch by index, the draws, forward,
backward, clipping, Adam and the EMA, called back to back on one batch) against the full `train_func` step
(adds the data order, the learning-rate schedule, moving the losses to the host every few steps), training
images/s, FLOPs per forward (torch.utils.flop_counter), achieved FLOP/s against the peak matmul FLOP/s
measured in the same run, the time to sample 10 digits with the 1000-step sampler and 100 with 50 DDIM
steps, and peak memory. The full step's speed is train_func's own, from its checkpoint's ledger (steps_per_s:
from the first logging point, after WARMUP steps of compilation and CUDA graphs, set-up left out). Random
images stand in for MNIST (the speed does not depend on them). For the GPU's training paths (the default
--compile against --graph_step) over a longer run, see experiments/gpu.py.
"""
import dataclasses
import os
import resource
import tempfile
import time

import common  # first: the repo's modules onto sys.path

# isort: split
import torch

import checkpoint
import config
from diffusion import GaussianDiffusion, to_model_range
from model import UNet, count_parameters
from sample import sample_func
from train import Run, make_optimizer, make_step, train_func
from utils import check_amp, resolve_device

WARMUP = 10  # steps before the timed ones (compilation, CUDA graphs); the full step's first logging point


def timed(device, fn):
    """Seconds that fn() takes, the device synchronised before and after."""
    common.sync(device)
    t0 = time.perf_counter()
    fn()
    common.sync(device)
    return time.perf_counter() - t0


def count_flops(model, batch, device):
    """(forward FLOPs, forward + backward FLOPs) per image, counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode
    x, t = torch.randn(batch, 1, 28, 28, device=device), torch.randint(0, 1000, (batch,), device=device)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x, t)
    fwd = fc.get_total_flops() / batch
    with FlopCounterMode(display=False) as fc:
        model(x, t).square().mean().backward()
    model.zero_grad(set_to_none=True)
    return fwd, fc.get_total_flops() / batch


def dense_op_share(model, batch, device, reps=5):
    """Share of an eager no-grad forward's CPU time spent inside the convolution, matmul and
    attention kernels (torch.profiler self time). torch.compile hands those to the same oneDNN
    kernels; what it can fuse or remove is the rest (norms, activations, adds, dispatch), so
    1 / share bounds its speed-up. CPU only (None elsewhere)."""
    if device.type != "cpu":
        return None
    from torch.profiler import ProfilerActivity, profile
    x, t = torch.randn(batch, 1, 28, 28), torch.randint(0, 1000, (batch,))
    with torch.no_grad():
        model(x, t)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(reps):
                model(x, t)
    times = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    kernels = ("mkldnn_convolution", "_slow_conv2d", "aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm",
               "scaled_dot_product", "flash_attention")
    dense = sum(v for k, v in times.items() if any(n in k for n in kernels))
    return dense / sum(times.values())


def peak_matmul_flops(device, dtype=torch.float32):
    """Best of 3 timings of a large square matmul (8192 on CUDA, 3072 on CPU): the attainable peak."""
    n, reps = (8192, 10) if device.type == "cuda" else (3072, 2)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    return max(2 * n ** 3 * reps / timed(device, lambda: [a @ b for _ in range(reps)]) for _ in range(3))


def bare_step_time(model, diffusion, device, cfg, steps):
    """Seconds per call of the repo's training step (train.make_step, without an EMA) on one batch, called
    back to back after WARMUP calls, nothing moved to the host: the floor for a training step."""
    opt, net = make_optimizer(model, device, cfg)  # as train_func sets them up
    run = Run(model, {}, opt, torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16"),
              torch.Generator(device=device).manual_seed(0))
    images = to_model_range(common.random_images(cfg.batch_size).to(device).float() / 255).unsqueeze(1)
    step = make_step(run, net, diffusion, cfg, images, None, slice(None))
    idx = torch.arange(cfg.batch_size, device=device)  # the whole batch, every step
    for _ in range(WARMUP):
        step(idx, cfg.lr, [])
    return timed(device, lambda: [step(idx, cfg.lr, []) for _ in range(steps)]) / steps


def full_step_time(model_args, diffusion, device, cfg, steps):
    """Seconds per step of train_func itself over `steps` steps after WARMUP, from its checkpoint's ledger
    (written before the file is: the save is not timed)."""
    cfg = dataclasses.replace(cfg, max_steps=WARMUP + steps, log_every=WARMUP, save_every=10 ** 9)
    with tempfile.TemporaryDirectory() as tmp:
        train_func(UNet(**model_args), diffusion, common.random_images(), cfg, os.path.join(tmp, "b.pt"),
                   device=device, progress=False)
        return 1 / checkpoint.load(os.path.join(tmp, "b.pt"))["sessions"][-1]["steps_per_s"]


def sample_time(net, n, sampler, device, amp, compile):
    """Seconds to draw n samples (ddpm: 1000 steps; ddim: 50 steps), after a warm-up (and compile)."""
    kw = dict(seed=0, device=device, progress=False, amp=amp, batch_size=n, compile=compile)
    sample_func(net, n, GaussianDiffusion(), sampler="ddim", sampling_steps=2, **kw)  # warm-up
    return timed(device, lambda: sample_func(net, n, GaussianDiffusion(), sampler=sampler,
                                             sampling_steps=50 if sampler == "ddim" else None, **kw))


def training_figures(model, diffusion, device, args, flops_per_train_image):
    """Peak matmul FLOP/s, bare and full training step times, and what follows from them."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp, torch.float32)
    res = {"peak_matmul_flops": peak_matmul_flops(device, dtype)}
    model_args, _, cfg = config.resolve(args.preset, batch_size=args.batch_size, amp=args.amp, compile=args.compile)
    res["full_step_s"] = full_step_time(model_args, diffusion, device, cfg, args.steps)
    res["bare_step_s"] = bare_step_time(model, diffusion, device, cfg, args.steps)
    res["overhead_fraction"] = 1 - res["bare_step_s"] / res["full_step_s"]
    res["train_img_per_s"] = args.batch_size / res["full_step_s"]
    res["achieved_flops"] = flops_per_train_image * res["train_img_per_s"]  # forward + backward
    res["fraction_of_peak"] = res["achieved_flops"] / res["peak_matmul_flops"]
    return res


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--preset", default="cpu", choices=sorted(config.PRESETS))
    config.add_device_flag(p)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed training steps")
    config.add_speed_flags(p)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--sample_only", action="store_true", help="skip the training measurements")
    args = p.parse_args(argv)
    if min(args.batch_size, args.steps) < 1:
        raise common.UserError("--batch_size and --steps must be >= 1")
    device = resolve_device(args.device)
    check_amp(device, args.amp)
    torch.manual_seed(0)
    model = UNet(**config.resolve(args.preset)[0]).to(device)
    res = {"preset": args.preset, "device": str(device), "batch_size": args.batch_size, "amp": args.amp,
           "compile": args.compile, "threads": torch.get_num_threads(), "params": count_parameters(model)}
    res["flops_per_forward"], res["flops_per_train_image"] = count_flops(model, 8, device)
    if not args.sample_only:
        res.update(training_figures(model, GaussianDiffusion(), device, args, res["flops_per_train_image"]))
    res["dense_op_share_b100"] = dense_op_share(model, 100, device)
    res["sample_10_s"] = sample_time(model, 10, "ddpm", device, args.amp, args.compile)
    res["sample_100_ddim50_s"] = sample_time(model, 100, "ddim", device, args.amp, args.compile)
    res["sample_img_nfe_per_s"] = 100 * 50 / res["sample_100_ddim50_s"]  # images x network evaluations / s
    res["peak_mem_mb"] = (torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda"
                          else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{res['threads']} threads"
    print(f"{args.preset} preset, {res['params'] / 1e6:.2f}M params, batch {args.batch_size}, {device} ({name}), "
          f"amp {args.amp}, compile {args.compile}")
    for key, value in res.items():  # seconds (_s), per second (_per_s), FLOPs, fractions, MB
        print(f"  {key:<24} {value:.4g}" if isinstance(value, float) else f"  {key:<24} {value}")
    if args.json:
        common.write_json(args.json, common.stamp(res))


if __name__ == "__main__":
    common.run_main(main)
