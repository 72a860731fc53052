"""Throughput of training and sampling for a preset, device and batch size.

    python experiments/benchmark.py --preset cpu --batch_size 128
    python experiments/benchmark.py --preset paper --device cuda --json bench.json
    python experiments/benchmark.py --preset cpu --sample_only --compile   # sampling alone, compiled
    python experiments/benchmark.py --probe 6000 --preset paper --device cuda --amp bf16 --compile

Reports: the bare training step (forward, backward, Adam) against the full `train_func` step
(adds batch drawing, EMA, LR schedule, loss bookkeeping), training images/s, FLOPs per forward
(torch.utils.flop_counter), achieved FLOP/s against the peak matmul FLOP/s measured in the same
run, the time to sample 10 digits with the 1000-step sampler and 100 with 50 DDIM steps, and peak memory.

--probe STEPS: instead, the steps/s of the full training step (`train.Trainer.train_step`) in windows of
--window steps (500), to see whether the speed drifts over a run (docs/gpu.md): one line per window after
the first. The loss is moved to the host every 25 steps, as in training (--no_flush: never). Random
images stand in for MNIST (the speed does not depend on them); no checkpoint is written.
"""
import contextlib
import os
import resource
import tempfile
import time

import common  # first: the repo's modules onto sys.path

# isort: split
import torch

import config
from diffusion import GaussianDiffusion
from model import UNet, count_parameters
from sample import sample_func
from train import Trainer, make_optimizer_and_net, train_func
from utils import autocast, check_amp, resolve_device

REPORT = (  # (label, the figure from the results) of the printed table
    ("bare step (fwd+bwd+Adam)", lambda r: f"{r['bare_step_s'] * 1e3:.1f} ms"),
    ("full train_func step", lambda r: f"{r['full_step_s'] * 1e3:.1f} ms"),
    ("loop overhead (data, EMA, logging)", lambda r: f"{100 * r['overhead_fraction']:.1f} %"),
    ("training images/s", lambda r: f"{r['train_img_per_s']:.0f}"),
    ("training steps/s", lambda r: f"{1 / r['full_step_s']:.1f}"),
    ("GFLOP per forward / per training image",
     lambda r: f"{r['flops_per_forward'] / 1e9:.3f} / {r['flops_per_train_image'] / 1e9:.3f}"),
    ("achieved GFLOP/s (training)", lambda r: f"{r['achieved_flops'] / 1e9:.1f}"),
    ("peak matmul GFLOP/s (measured)", lambda r: f"{r['peak_matmul_flops'] / 1e9:.1f}"),
    ("fraction of peak", lambda r: f"{100 * r['fraction_of_peak']:.0f} %"),
    ("sample 10 digits, DDPM 1000 steps", lambda r: f"{r['sample_10_s']:.1f} s"),
    ("sample 100 digits, DDIM 50 steps", lambda r: f"{r['sample_100_ddim50_s']:.1f} s"),
    ("sampling images x NFE / s (batch 100)", lambda r: f"{r['sample_img_nfe_per_s']:.0f}"),
    ("conv/matmul/attention share, eager fwd",
     lambda r: "-" if r["dense_op_share_b100"] is None else f"{100 * r['dense_op_share_b100']:.0f} %"),
    ("peak memory", lambda r: f"{r['peak_mem_mb']:.0f} MB"),
)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(device, fn):
    """Seconds that fn() takes, the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
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


def bare_step_time(model, diffusion, batch, device, steps, amp="none", compile=False):
    """Forward, backward and Adam on one fixed batch: the floor for a training step."""
    opt, net = make_optimizer_and_net(model, device, 1e-4, compile)  # as train_func sets them up
    x0 = torch.rand(batch, 1, 28, 28, device=device) * 2 - 1
    g = torch.Generator(device=device).manual_seed(0)

    def step():
        with autocast(device, amp):
            loss = diffusion.training_losses(net, x0, g).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    for _ in range(3):  # warm-up
        step()
    return timed(device, lambda: [step() for _ in range(steps)]) / steps


def full_step_time(model, diffusion, batch, device, steps, tmp_ckpt, amp="none", compile=False):
    """train_func itself (data by index, EMA, schedule, logging), minus a short run's fixed cost."""
    images = torch.randint(0, 256, (60000, 28, 28), dtype=torch.uint8)
    cfg = dict(n_epochs=1, batch_size=batch, save_every=10 ** 9, warmup=100, amp=amp, compile=compile)
    times = [timed(device, lambda n=n: train_func(UNet(**model.model_args), diffusion, images, config.TrainConfig(
        max_steps=n, **cfg), tmp_ckpt, device=device, progress=False))
        for n in ((3, 3, 3 + steps) if compile else (3, 3 + steps))]  # with compile, a first call warms its cache
    return (times[-1] - times[-2]) / steps


def sample_time(net, n, sampler, device, amp, compile):
    """Seconds to draw n samples (ddpm: 1000 steps; ddim: 50 steps), after a warm-up (and compile)."""
    kw = dict(seed=0, device=device, progress=False, amp=amp, batch_size=n, compile=compile)
    sample_func(net, n, GaussianDiffusion(), sampler="ddim", sampling_steps=2, **kw)  # warm-up
    return timed(device, lambda: sample_func(net, n, GaussianDiffusion(), sampler=sampler,
                                             sampling_steps=50 if sampler == "ddim" else None, **kw))


def probe(model_args, device, args):
    """--probe: steps/s of Trainer.train_step in windows of --window steps."""
    _, dargs, cfg = config.resolve(args.preset, amp=args.amp, compile=args.compile, save_every=10 ** 9,
                                   max_steps=args.probe, batch_size=args.batch_size)
    images = torch.randint(0, 256, (60000, 28, 28), dtype=torch.uint8)
    tr = Trainer(UNet(**model_args), GaussianDiffusion(**dargs), images, None, cfg,
                 os.path.join(tempfile.gettempdir(), "_ddpm_probe.pt"), device)
    tr.start()
    t_prev, s_prev = None, 0
    while tr.step < args.probe:
        tr.train_step(tr.batch())
        if not args.no_flush and tr.step % 25 == 0:
            tr.flush()
        if tr.step % args.window == 0:
            sync(device)
            now = time.perf_counter()
            if t_prev is not None:
                print(f"flush={not args.no_flush} steps {s_prev}-{tr.step}: "
                      f"{(tr.step - s_prev) / (now - t_prev):.1f} steps/s", flush=True)
            t_prev, s_prev = now, tr.step


def training_figures(model, diffusion, device, args, flops_per_train_image):
    """Peak matmul FLOP/s, bare and full training step times, and what follows from them."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp, torch.float32)
    res = {"peak_matmul_flops": peak_matmul_flops(device, dtype)}
    speed = dict(amp=args.amp, compile=args.compile)
    res["bare_step_s"] = bare_step_time(model, diffusion, args.batch_size, device, args.steps, **speed)
    res["full_step_s"] = full_step_time(model, diffusion, args.batch_size, device, args.steps,
                                        os.path.join(tempfile.gettempdir(), "_ddpm_bench.pt"), **speed)
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
    p.add_argument("--probe", type=int, metavar="STEPS", help="only the training step's speed over STEPS steps")
    p.add_argument("--window", type=int, default=500, help="--probe: steps per speed figure")
    p.add_argument("--no_flush", action="store_true", help="--probe: never move the loss to the host")
    args = p.parse_args(argv)
    if min(args.batch_size, args.steps, args.window, 1 if args.probe is None else args.probe) < 1:
        raise common.UserError("--batch_size, --steps, --window and --probe must be >= 1")
    device = resolve_device(args.device)
    check_amp(device, args.amp)
    torch.manual_seed(0)
    if args.probe is not None:
        return probe(config.resolve(args.preset)[0], device, args)
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
    for label, cell in REPORT:
        with contextlib.suppress(KeyError):  # a figure this run did not measure (--sample_only: training)
            print(f"  {label:<38} {cell(res):>12}")
    if args.json:
        common.write_json(args.json, res)


if __name__ == "__main__":
    common.run_main(main)
