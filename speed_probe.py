"""Steps/s of the paper preset's full training step (`train.Trainer.train_step`, bf16 + compile),
in windows of 500 steps, to see whether the speed drifts over a run (docs/gpu.md).

    python speed_probe.py 6000 flush cuda     # the loss moved to the host every 25 steps, as in training
    python speed_probe.py 1000 noflush cpu    # a tiny model on the CPU: a check of the script itself

No checkpoint is written. Prints one line per window after the first.
"""
import sys
import time

import torch

import config
from dataloader import mnist_tensors
from diffusion import GaussianDiffusion
from model import UNet
from train import Trainer

TINY = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_res=(14,))


def main(steps, flush, device):
    dev = torch.device(device)
    model_args, dargs, cfg = config.resolve("paper", amp="bf16", compile=True, save_every=10 ** 9, max_steps=steps,
                                            **({} if dev.type == "cuda" else TINY))
    torch.manual_seed(0)
    images, _ = mnist_tensors("data", train=True, verbose=False)
    tr = Trainer(UNet(**model_args), GaussianDiffusion(**dargs), images, None, cfg, "/tmp/probe.pt", dev)
    tr.start()
    t_prev, s_prev = None, 0
    while tr.step < steps:
        tr.train_step(*tr.batch())
        if flush and tr.step % 25 == 0:
            tr.flush()
        if tr.step % 500 == 0:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            if t_prev is not None:
                print(f"flush={flush} steps {s_prev}-{tr.step}: {(tr.step - s_prev) / (now - t_prev):.1f} steps/s",
                      flush=True)
            t_prev, s_prev = now, tr.step


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2] == "flush", sys.argv[3] if len(sys.argv) > 3 else "cuda")
