"""Throughput of training and sampling for a preset, device and batch size.

    python benchmark.py --preset cpu --batch_size 128
    python benchmark.py --preset paper --device cuda --json bench.json

Reports: the bare training step (forward, backward, Adam) against the full `train_func` step
(adds batch drawing, EMA, LR schedule, loss bookkeeping), training images/s, FLOPs per forward
(torch.utils.flop_counter), achieved FLOP/s against the peak matmul FLOP/s measured in the same
run, the time to sample 10 digits with the 1000-step sampler, and peak memory.
"""
import json
import resource
import time

import torch

from diffusion import GaussianDiffusion, to_model_range
from model import UNet, count_parameters
from run import PRESETS
from sample import sample_func
from train import TrainConfig, train_func
from utils import OneLineArgumentParser, UserError, atomic_write, resolve_device, run_main


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def model_for(preset):
    p = PRESETS[preset]
    return dict(ch=p["ch"], ch_mult=p["ch_mult"], num_res_blocks=p["num_res_blocks"],
                attn_resolutions=p["attn_res"], dropout=p["dropout"])


def forward_flops(model, batch, device):
    from torch.utils.flop_counter import FlopCounterMode
    x, t = torch.randn(batch, 1, 28, 28, device=device), torch.randint(0, 1000, (batch,), device=device)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x, t)
    return fc.get_total_flops() / batch


def peak_matmul_flops(device, n=2048, reps=10):
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def bare_step_time(model, diffusion, batch, device, steps):
    """Forward, backward and Adam on one fixed batch: the floor for a training step."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x0 = torch.rand(batch, 1, 28, 28, device=device) * 2 - 1
    g = torch.Generator(device=device).manual_seed(0)
    for i in range(steps + 3):
        if i == 3:
            sync(device)
            t0 = time.perf_counter()
        loss = diffusion.training_losses(model, x0, g).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    sync(device)
    return (time.perf_counter() - t0) / steps


def full_step_time(model, diffusion, batch, device, steps, tmp_ckpt):
    """train_func itself (data by index, EMA, schedule, logging), minus a short run's fixed cost."""
    images = torch.randint(0, 256, (60000, 28, 28), dtype=torch.uint8)
    times = []
    for n in (3, 3 + steps):
        cfg = TrainConfig(n_epochs=1, max_steps=n, batch_size=batch, save_every=10 ** 9, warmup=100)
        sync(device)
        t0 = time.perf_counter()
        train_func(UNet(**model.model_args), diffusion, images, cfg, tmp_ckpt, device=device, progress=False)
        sync(device)
        times.append(time.perf_counter() - t0)
    return (times[1] - times[0]) / steps


def main(argv=None):
    p = OneLineArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--device", default="auto")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed training steps")
    p.add_argument("--sample_steps", type=int, default=1000, help="reverse steps when timing sampling")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.steps < 1:
        raise UserError("--batch_size and --steps must be >= 1")
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = UNet(**model_for(args.preset)).to(device)
    diffusion = GaussianDiffusion()
    res = {"preset": args.preset, "device": str(device), "batch_size": args.batch_size,
           "threads": torch.get_num_threads(), "params": count_parameters(model)}
    res["flops_per_forward"] = forward_flops(model, 8, device)
    res["peak_matmul_flops"] = peak_matmul_flops(device)
    res["bare_step_s"] = bare_step_time(model, diffusion, args.batch_size, device, args.steps)
    res["full_step_s"] = full_step_time(model, diffusion, args.batch_size, device, args.steps, "/tmp/_bench_ckpt.pt")
    res["overhead_fraction"] = 1 - res["bare_step_s"] / res["full_step_s"]
    res["train_img_per_s"] = args.batch_size / res["full_step_s"]
    # forward + backward is about 3 forwards of FLOPs
    res["achieved_flops"] = 3 * res["flops_per_forward"] * res["train_img_per_s"]
    res["fraction_of_peak"] = res["achieved_flops"] / res["peak_matmul_flops"]
    d = GaussianDiffusion(T=args.sample_steps)
    sync(device)
    t0 = time.perf_counter()
    sample_func(model, 10, d, seed=0, device=device, progress=False)
    sync(device)
    res["sample_10_s"] = (time.perf_counter() - t0) * 1000 / args.sample_steps  # scaled to 1000 steps
    res["peak_mem_mb"] = (torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda"
                          else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(f"{args.preset} preset, {res['params'] / 1e6:.2f}M params, batch {args.batch_size}, {device}, "
          f"{res['threads']} threads")
    rows = [("bare step (fwd+bwd+Adam)", f"{res['bare_step_s'] * 1e3:.1f} ms"),
            ("full train_func step", f"{res['full_step_s'] * 1e3:.1f} ms"),
            ("loop overhead (data, EMA, logging)", f"{100 * res['overhead_fraction']:.1f} %"),
            ("training images/s", f"{res['train_img_per_s']:.0f}"),
            ("GFLOP per forward", f"{res['flops_per_forward'] / 1e9:.3f}"),
            ("achieved GFLOP/s (training)", f"{res['achieved_flops'] / 1e9:.1f}"),
            ("peak matmul GFLOP/s (measured)", f"{res['peak_matmul_flops'] / 1e9:.1f}"),
            ("fraction of peak", f"{100 * res['fraction_of_peak']:.0f} %"),
            ("sample 10 digits, 1000 steps", f"{res['sample_10_s']:.1f} s"),
            ("peak memory", f"{res['peak_mem_mb']:.0f} MB")]
    for name, val in rows:
        print(f"  {name:<38} {val:>12}")
    if args.json:
        atomic_write(args.json, lambda f: f.write(json.dumps(res, indent=1).encode()))


if __name__ == "__main__":
    run_main(main)
